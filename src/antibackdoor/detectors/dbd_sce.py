"""DBD's isolation score as a detector: the SCE loss of a linear head warmed up on a SimCLR backbone.

The backbone is trained without labels (DBD stage 1), the head with SCE on the frozen backbone (stage 2); a
poisoned sample's features sit near its true class, so the head fits its target label badly and its loss is
high. DBD's rule labels the lowest ``epsilon`` (50 %) and treats the rest as unlabelled: the isolated set.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import param
from ..stages.dbd import QUICK_DBD, DBDParams, lowest, make_dbd_optimizer, sce_scores, simclr_pretrain, warmup_head
from .base import Detector, IsolationRule, Scored, register_detector, rule_param


@dataclass(frozen=True)
class DBDSCEParams:
    dbd: DBDParams = param(factory=DBDParams, doc="DBD's SimCLR and warm-up settings (its rounds are unused)")
    rule: IsolationRule = rule_param()


@register_detector
class DBDSCE(Detector):
    name = "dbd-sce"
    description = "DBD's score: SCE loss of a linear head on a SimCLR backbone; the highest 50% are isolated"
    Params = DBDSCEParams
    presets = {"quick": DBDSCEParams(QUICK_DBD), "paper": DBDSCEParams(DBDParams())}
    needs_model = False
    has_native_rule = True
    higher_is_suspicious = True
    score_name = "dbd_sce"
    paper_settings_of = "dbd"
    paper_param_names = {"*": "dbd"}  # every DBD setting: the detector holds all of DBDParams

    def _score(self, data, ctx, model):
        p = self.params.dbd
        net = ctx.fresh_model("dbd")  # DBD's own model: the detector is DBD's split after the warm-up
        simclr_pretrain(net, data, p, ctx)
        hist = warmup_head(net, make_dbd_optimizer(net, p), data, p, ctx)
        scores = sce_scores(net, data, p, ctx.device, precision=ctx.compute_precision())
        info = {"warmup_train_acc": hist[-1]["train_acc"] if hist else None}
        return Scored(scores, ~lowest(scores, p.epsilon), info=info)
