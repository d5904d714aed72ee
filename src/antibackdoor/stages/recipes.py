"""The training recipes that several parts share, in one place: a detector's suspect model and A-ABL's stage 1
must be the same training to score alike, and the baselines start from the same plain model as ``none``.

``quick`` recipes are CPU-sized (the quick CNN on the mini CIFAR-10, minutes on 2 cores); ``paper`` ones are the
papers' settings.
"""

from __future__ import annotations

from ..adversarial.pgd import PGDConfig
from ..training import TrainConfig

# -- plain training: the `none` defense, the backdoored model NAD and D-BR purify ----------------------------
#: quick: also A-ABL's quick stage 1, so `none` shows what that stage learns: Adam 2e-3 with a cosine decay over
#: 25 epochs, crop without flip (a flip moves a corner patch to the other corner; docs/a-abl.md)
QUICK_PLAIN = TrainConfig(epochs=25, optimizer="adam", lr=2e-3, crop=4, flip=False, schedule="cosine")
PAPER_PLAIN = TrainConfig(epochs=100, optimizer="sgd", lr=0.1, schedule="step", milestones=(50, 75, 90), crop=4,
                          flip=True)

# -- PGD adversarial training: `adv-train` and A-ABL's stage 3 ------------------------------------------------
PAPER_AT = TrainConfig(epochs=100, optimizer="sgd", lr=0.1, schedule="step", milestones=(50, 75, 90),
                       crop=4, flip=True, adversary=PGDConfig(eps=8 / 255, step=2 / 255, steps=10))
#: CPU budget: 2-step PGD (step 4/255 reaches the 8/255 boundary), 20 epochs of Adam on a cosine schedule. SGD
#: does not suit the small quick CNN under PGD: at lr 0.05 the first epoch diverged (loss 8.6) and the model
#: collapsed to one class (BadNets 10%: test ACC 10.3%); Adam 1e-3 reached 48.5% (SGD 0.01: 42.7%) (a one-off probe
#: of the three recipes, 20 epochs each, mini CIFAR-10, BadNets at target 0, seed 0).
QUICK_AT = TrainConfig(epochs=20, optimizer="adam", lr=1e-3, schedule="cosine", crop=4, flip=True,
                       adversary=PGDConfig(eps=8 / 255, step=4 / 255, steps=2))

# -- A-ABL's stage 1, the naive model; also the suspect model every model-based detector scores ------------
#: the paper: Adam at a fixed learning rate 1e-3 for 20 epochs ("adam" is AdamW here, weight decay 5e-4, with
#: the loop's default crop and flip: docs/a-abl.md lists these choices)
PAPER_NAIVE = TrainConfig(epochs=20, optimizer="adam", lr=1e-3)
#: the split only works once the naive model has learned the backdoor firmly; 25 epochs of Adam at 2e-3 with a
#: cosine decay isolate as much poison as 40 at a constant 1e-3 in 60 % of the time (mini CIFAR-10, BadNets,
#: targets 0 and 3: docs/a-abl.md)
QUICK_NAIVE = QUICK_PLAIN
QUICK_SUSPECT, PAPER_SUSPECT = QUICK_NAIVE, PAPER_NAIVE

# -- DBD (the authors' configs; the quick preset is in defenses/dbd.py) -----------------------------------------
PAPER_SIMCLR = TrainConfig(epochs=100, batch_size=512, optimizer="sgd", lr=0.4, momentum=0.9, weight_decay=1e-4,
                           schedule="cosine", crop=0, flip=False)
#: Adam without weight decay, as the authors' configs ("adam" is AdamW here; with weight_decay 0 it is Adam)
PAPER_WARMUP = TrainConfig(epochs=10, batch_size=128, optimizer="adam", lr=0.002, weight_decay=0.0, crop=4,
                           flip=True)
PAPER_FINETUNE = TrainConfig(epochs=190, batch_size=64, optimizer="adam", lr=0.002, weight_decay=0.0, crop=4,
                             flip=True)
