"""Attack-failure indicators (Pintor et al., "Indicators of Attack Failure", NeurIPS 2022), per attack.

A robust example is evidence only if the attack that left it could have broken it. Each indicator is a
small check of one way an attack fails silently; computed for every attack of the adaptive evaluation
(``--attack adaptive``), stored in results.json (``indicators``) and printed under the per-attack table:

- ``reproduction`` — every break is reproduced by the evaluated model on the stored point, with the
  decision's own seeded draws. A break that is not is a bug of the evaluation (an example counted as
  broken by a model other than the one evaluated), not a finding. randAA's verdict is the library's
  single draw from the global RNG (the paper's protocol): its breaks that no seeded draw reproduces are
  listed apart (``library_draw_only``), not failed.
- ``unbounded`` — the attack at ε = 0.5 (reduced steps, on the first ``--indicator-examples``) must break
  (about) every example: every image in [0, 1] lies within 0.5 of the grey image, so an attack that
  cannot is blind on this model (Pintor's "unbounded attack").
- ``convergence`` — the examples the attack left, attacked again with 2× steps and 2× EoT: it fails when
  the doubled budget breaks examples beyond the noise of the ``--repeats`` re-classifications, or raises
  the attack loss (DLR, scale-free, EoT-averaged on the evaluated model) beyond its noise.
- ``transfer`` — transfer and black-box attacks break examples that every white-box attack left: the
  white-box gradients are not useful on this model (AutoAttack's own check of Square against APGD).
- ``eot_noise`` — the mean cosine similarity ρ of single-draw input gradients on the attack's surface,
  and the EoT count it implies: the mean of K draws has an expected cosine with another such mean of
  Kρ / (1 + (K−1)ρ) (draws = a common direction + independent noise), so K = c(1−ρ) / (ρ(1−c)) reaches
  ``EOT_TARGET_COSINE`` = c. It fails when that K exceeds the attack's EoT iterations.

The extra cost is bounded by ``--indicator-examples`` (the first N examples of the evaluation, whatever
the batching); ``reproduction`` (a few forwards per break) and ``transfer`` (from the flags) cover every
example. Each indicator is a dataclass of counts that batches sum (``+``), ``status`` "pass"/"fail"/"n/a".
"""

from carso_cli.evaluation.indicators.measures import *  # noqa: F403
from carso_cli.evaluation.indicators.measures import __all__ as _measures
from carso_cli.evaluation.indicators.wiring import (
    attack_fn,
    batch_indicators,
    doubled_settings,
    indicators_summary,
    unbounded_settings,
)

__all__ = [*_measures, "attack_fn", "batch_indicators", "doubled_settings", "indicators_summary", "unbounded_settings"]
