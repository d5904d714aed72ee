"""DBD's isolation score as a detector: the SCE loss of a linear head warmed up on a SimCLR backbone.

The backbone is trained without labels (DBD stage 1), the head with SCE on the frozen backbone (stage 2); a
poisoned sample's features sit near its true class, so the head fits its target label badly and its loss is
high. DBD's rule labels the lowest ``epsilon`` (50 %) and treats the rest as unlabelled: the isolated set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..defenses.dbd import DBD, DBDParams, lowest, sce_scores, simclr_pretrain, warmup_head
from .base import Detector, IsolationRule, register_detector


@dataclass(frozen=True)
class DBDSCEParams:
    dbd: DBDParams = field(default_factory=DBDParams)  # SimCLR and warm-up settings (the rounds are unused)
    rule: IsolationRule = field(default_factory=IsolationRule)


@register_detector
class DBDSCE(Detector):
    name = "dbd-sce"
    description = "DBD's score: SCE loss of a linear head on a SimCLR backbone; the highest 50% are isolated"
    Params = DBDSCEParams
    presets = {"quick": DBDSCEParams(DBD.presets["quick"]), "paper": DBDSCEParams(DBD.presets["paper"])}
    needs_model = False
    higher_is_suspicious = True
    score_name = "dbd_sce"

    def _score(self, data, ctx, model):
        p = self.params.dbd
        p.validate()
        net = ctx.fresh_model()
        simclr_pretrain(net, data, p, ctx)
        opt = torch.optim.Adam(net.parameters(), lr=p.finetune.lr)
        hist = warmup_head(net, opt, data, p, ctx)
        scores = sce_scores(net, data, p, ctx.device)
        info = {"warmup_train_acc": hist[-1]["train_acc"] if hist else None}
        return scores, ~lowest(scores, p.epsilon), info
