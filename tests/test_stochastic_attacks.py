"""Issue 20: the attacks on stochastic purification, each proven on a trap model built to need it.

Each trap is a toy CARSO on which (a) today's adaptive attacks (``adaptive.ATTACKS`` but Square, same
budget) leave every example robust, (b) the new attack breaks every one, judged by the model as
evaluated, and (c) the new attack turned into a no-op (its points = the input) breaks none. The break
direction is the mean pixel: ``u`` = (mean(x) − 0.5)/ε ∈ [−1, 1]; a random start moves u by ~0.07 (σ),
and every trap's break needs |u| ≥ 0.6, so random starts alone break nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from carso_cli import evaluation as ev
from carso_cli.errors import CarsoError
from carso_cli.evaluation import adaptive, stochastic_attacks
from carso_cli.evaluation.ascent import margin, top_targets
from carso_cli.evaluation.fixed_randomness import FixedLatents
from carso_cli.evaluation.selective_eot import selection
from carso_cli.models.carso import CARSO, standard_normal_sampler
from carso_cli.models.representation import forward_with_representation

EPS = 8 / 255
SHAPE = (1, 8, 8)
N = 4  # examples per trap
CPU = torch.device("cpu")
# The adaptive evaluation before issue 20 (Square aside): what each trap must defeat.
TODAY = [a for a in adaptive.ATTACKS if a != "square" and a not in stochastic_attacks.ATTACKS]
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, …), z (N, B, D)) → logits (N, B, C)


class ToyCARSO(CARSO):
    """A CARSO whose reconstruction logits (N, B, C) are a given function of x and of the latents z."""

    def __init__(self, fn: LogitsFn, samples: int = 2, latent_dim: int = 1) -> None:
        nn.Module.__init__(self)
        self.fn = fn
        self.samples = samples
        self.latent_dim = latent_dim
        self.aggregation = "dexp"
        self.latent_sampler = standard_normal_sampler
        self.keep_reconstructions = False
        self.final_classifier = None
        # A representation with nothing to follow (constant, zero gradient): the representation attack
        # runs in the adaptive evaluation of every trap, and only its own trap exposes one.
        self.classifier = FlatClassifier()
        self.layers = ["feat"]
        self.purifier = nn.Module()
        self.purifier.condition_encoder = Fn(lambda rep: rep[0])

    def sample_latent(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.latent_sampler(self.samples, batch_size, self.latent_dim, device, dtype)

    def reconstruction_logits(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(x, self.sample_latent(x.shape[0], x.device, x.dtype) if z is None else z)


class FlatClassifier(nn.Module):
    """Class 0 everywhere; its hooked layer ``feat`` is constant: no representation to move."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = Fn(lambda x: torch.ones(x.shape[0], 1) + 0.0 * x.flatten(1).sum(1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([5.0, 0.0, 0.0, 0.0]) + 0.0 * self.feat(x)


class Fn(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _u(x: torch.Tensor) -> torch.Tensor:
    """(B,): the mean pixel's offset from the clean 0.5, in units of ε."""
    return (x.flatten(1).mean(dim=1) - 0.5) / EPS


def _logits(*columns: torch.Tensor) -> torch.Tensor:
    return torch.stack(columns, dim=-1)


def _settings(**kw: object) -> ev.EvalSettings:
    base: dict[str, object] = {
        "attack": "adaptive",
        "targets": ["carso"],
        "n_examples": N,
        "batch_size": N,
        "repeats": 2,
        "aa_steps": 10,
        "aa_eot": 4,
        "pgd_steps": 10,
        "pgd_step_size": EPS / 4,
        "pgd_eot": 4,
        "eps": EPS,
        "square_queries": 20,
    }
    base.update(kw)
    return ev.EvalSettings(**base)  # type: ignore[arg-type]


def _survivors(model: nn.Module, classifier: nn.Module, names: list[str], run: Callable, s: ev.EvalSettings):
    """(N,) bool: right clean and survived every attack of ``names``, judged by ``model`` as evaluated."""
    x = torch.full((N, *SHAPE), 0.5)
    y = torch.zeros(N, dtype=torch.long)
    idx = list(range(N))
    alive = ev.draw_flags(model, x, y, idx, s.seed, ev.STREAM_CLEAN)[0]
    assert alive.all(), "the trap must classify its clean examples right"
    for name in names:
        c = run(name, model, classifier, x, y, idx, s, CPU)
        survived, _, _ = adaptive.judge_candidates(model, c, y, idx, s)
        alive &= survived
    return alive


# --------------------------------------------------------------------------------------------------
# The traps
# --------------------------------------------------------------------------------------------------


class Representation(nn.Module):
    """The hooked layer: u as a (B, 1) feature (the representation the purifier is conditioned on)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _u(x)[:, None]


class BlindClassifier(nn.Module):
    """Class 0 everywhere, with a zero input gradient: the transfer from it has nothing to follow."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = Representation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feat(x)
        return torch.tensor([5.0, 0.0, 0.0, 0.0]) + 0.0 * f


class QuantisedCARSO(ToyCARSO):
    """Trap 1: the decision sits behind a zero-gradient quantiser q = round(4c) of the code c = u; wrong
    when |q| ≥ 3 (|u| ≥ 0.625), either way. Gradients through the whole model are exactly 0."""

    def __init__(self) -> None:
        super().__init__(self._quantised)
        self.classifier = BlindClassifier()
        self.layers = ["feat"]
        self.purifier = nn.Module()
        self.purifier.condition_encoder = Fn(lambda rep: 1.0 * rep[0])

    def _quantised(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        _, rep = forward_with_representation(self.classifier, self.layers, x)
        q = torch.round(4.0 * self.purifier.condition_encoder(rep)[:, 0]).abs()  # d round / dc = 0
        one = torch.ones_like(q)
        return _logits(one, q - 1.5, -5.0 * one, -5.0 * one).expand(self.samples, -1, -1) + 0.0 * z


def _decoy(x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """Trap 2: class 1 (the decoy) rises with u but stays below class 0 (≤ 3.5 < 5); class 2 falls with u
    and passes class 0 at u < −0.85. Cross-entropy, DLR and the untargeted margin all follow the decoy
    (u → +1); only a run towards class 2 goes the other way. Deterministic."""
    u = _u(x)
    one = torch.ones_like(u)
    logits = _logits(5.0 * one, 2.0 + 1.5 * u, -3.0 - 9.4 * u, -10.0 * one)
    return logits[None].expand(2, -1, -1) if z is not None else logits


def _noisy(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Trap 3: every draw is wrong at u > 0.6, but the latent noise a·sin(ω⟨x − 0.5, z⟩) (a = 0.05, ω =
    2·10⁴) gives each draw an input gradient ~10³× the useful one, in a random direction: EoT with a
    few draws is noise. At z = 0 the noise and its gradient vanish."""
    u = _u(x)[None]
    noise = 0.05 * torch.sin(2e4 * torch.einsum("bp,nbp->nb", (x - 0.5).flatten(1), z))
    zero = torch.zeros_like(noise)
    return _logits(zero, 4.0 * u - 2.4 + noise, zero - 9.0, zero - 9.0)


def _some_vulnerable(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Trap 4: a quarter of the draws (z₀ > 0.674) is vulnerable (logit 6u − 3: one such draw fools a
    forward of 8 at u > 0.85); the others never are (logit −4 + 0.05·sin(ω⟨x − 0.5, z₁…⟩)) and their
    input gradient is noise ~10³× larger. EoT averages the noise; the margin points at the vulnerable."""
    u = _u(x)[None]
    vulnerable = z[..., 0] > 0.674
    noise = 0.05 * torch.sin(2e4 * torch.einsum("bp,nbp->nb", (x - 0.5).flatten(1), z[..., 1:]))
    l1 = torch.where(vulnerable, 6.0 * u - 3.0, -4.0 + noise)
    zero = torch.zeros_like(l1)
    return _logits(zero, l1, zero - 9.0, zero - 9.0)


TRAPS = {
    "representation": lambda: (QuantisedCARSO(), BlindClassifier()),
    "apgd-t-eot": lambda: (ToyCARSO(_decoy), Fn(_decoy)),
    "pgd-cw-eot": lambda: (ToyCARSO(_decoy), Fn(_decoy)),
    "fixed-randomness": lambda: (ToyCARSO(_noisy, samples=4, latent_dim=64), BlindClassifier()),
    "selective-eot": lambda: (ToyCARSO(_some_vulnerable, samples=8, latent_dim=65), BlindClassifier()),
}
POINTS = {  # the function behind each attack in stochastic_attacks, for the no-op mutation
    "representation": "representation_points",
    "apgd-t-eot": "apgd_t_eot_points",
    "pgd-cw-eot": "pgd_cw_eot_points",
    "fixed-randomness": "fixed_randomness_points",
    "selective-eot": "selective_eot_points",
}


# The sub-attacks that must break every example of their trap: the mechanism the trap was built for.
BREAKERS = {
    "representation": ["representation-away", "code-away"],
    "apgd-t-eot": ["apgd-t:2"],  # the second target; the first is the decoy
    "pgd-cw-eot": ["cw:2"],
    "fixed-randomness": ["z0/apgd-ce", "z0/apgd-t"],  # z = 0 removes the latent noise
    "selective-eot": ["selective-eot"],
}


def _broken_by(model: nn.Module, c: adaptive.Candidates, s: ev.EvalSettings) -> dict[str, torch.Tensor]:
    """Per source, the examples (N,) bool its candidate breaks, judged by the model as evaluated."""
    y, idx = torch.zeros(N, dtype=torch.long), list(range(N))
    out = {}
    for source, points in zip(c.sources, c.points):
        survived, _, _ = adaptive.judge_candidates(model, adaptive.Candidates(points[None], [source]), y, idx, s)
        out[source] = ~survived
    return out


@pytest.mark.parametrize("attack", list(TRAPS))
def test_trap_needs_the_new_attack(attack: str, capsys) -> None:
    with capsys.disabled():
        print(check_trap_needs_the_new_attack(attack))


def check_trap_needs_the_new_attack(attack: str) -> str:
    """Today's attacks leave the trap of ``attack`` robust, ``attack`` breaks it all (its breaker sub-attacks
    each every example); returns the counts as a line (also the mutation tests' catcher)."""
    model, classifier = TRAPS[attack]()
    s = _settings()
    today = int(_survivors(model, classifier, TODAY, adaptive.run_candidates, s).sum())
    x, y = torch.full((N, *SHAPE), 0.5), torch.zeros(N, dtype=torch.long)
    by = _broken_by(model, adaptive.run_candidates(attack, model, classifier, x, y, list(range(N)), s, CPU), s)
    new = N - int(torch.stack(list(by.values())).any(dim=0).sum())  # robust: survived every candidate
    counts = {source: int(b.sum()) for source, b in by.items()}
    assert today == N, f"today's attacks already break {N - today} examples of the {attack} trap"
    assert new == 0, f"{attack} left {new} examples of its trap robust"
    assert all(counts[source] == N for source in BREAKERS[attack]), counts
    return f"\n{attack}: robust after today's attacks {today}/{N}, after {attack} {new}/{N}; broken by {counts}"


@pytest.mark.parametrize("attack", list(TRAPS))
def test_trap_fails_when_the_attack_is_a_noop(attack: str, monkeypatch) -> None:
    monkeypatch.setattr(stochastic_attacks, POINTS[attack], lambda model, x, *a, **k: (x.detach()[None], ["noop"]))
    model, classifier = TRAPS[attack]()
    s = _settings()
    survivors = _survivors(model, classifier, [attack], adaptive.run_candidates, s)
    assert survivors.all()  # the trap's breaks come from the attack, not from the toy or the judge


@pytest.mark.parametrize("attack", list(TRAPS))
@pytest.mark.parametrize("noop", [False, True], ids=["wired", "noop"])
def test_the_default_adaptive_evaluation_breaks_every_trap(attack: str, noop: bool, monkeypatch) -> None:
    """Through ``--attack adaptive``'s own path (``evaluate_batch``, every attack in order, each judged by
    the model as evaluated): every trap falls, to one of issue 20's attacks (several may share a trap:
    fixed-randomness runs APGD-T, so it breaks the decoy too), and the trap's own attack alone
    (``--attack NAME``) breaks it all. With the five attacks made no-ops, nothing falls."""
    if noop:
        for name in POINTS.values():
            monkeypatch.setattr(stochastic_attacks, name, lambda model, x, *a, **k: (x.detach()[None], ["noop"]))
    model, classifier = TRAPS[attack]()
    x, y = torch.full((N, *SHAPE), 0.5), torch.zeros(N, dtype=torch.long)
    s = _settings(indicators=False)
    adv: dict[str, torch.Tensor] = {}
    out = ev.evaluate_batch(classifier, model, x, y, range(N), s, CPU, adversarial=adv)
    assert out["carso_clean"] == [1] * N
    first = {a: out[adaptive.flag_key(a)] for a in s.adaptive_attacks}
    assert all(first[a] == [1] * N for a in TODAY), first  # the attacks before issue 20 leave the trap alone
    if noop:
        assert out["carso_adaptive"] == [1] * N, first
        return
    assert out["carso_adaptive"] == [0] * N, first
    assert (adv["carso_adaptive"] - x).abs().amax() <= EPS + 1e-6  # the breaking points are the ones kept
    alone = ev.evaluate_batch(classifier, model, x, y, range(N), _settings(attack=attack, indicators=False), CPU)
    assert alone[adaptive.flag_key(attack)] == [0] * N and alone["carso_adaptive"] == [0] * N


def test_each_attack_runs_alone() -> None:
    """``--attack NAME``: the adaptive machinery with that one attack (no randAA), its C/ column the same."""
    model, classifier = TRAPS["representation"]()
    s = _settings(attack="representation", indicators=False)
    assert s.adaptive_attacks == ["representation"] and s.is_adaptive
    x, y = torch.full((N, *SHAPE), 0.5), torch.zeros(N, dtype=torch.long)
    out = ev.evaluate_batch(classifier, model, x, y, range(N), s, CPU)
    assert out["adaptive_representation"] == [0] * N and out["carso_adaptive"] == [0] * N
    assert "carso_randaa" not in out and set(out["adaptive_wall_s"]) == {"representation"}
    with pytest.raises(CarsoError, match="unknown attack"):
        _settings(attack="randaa").validate()  # randAA alone is --attack autoattack


# --------------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------------


def test_margin_and_targets() -> None:
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0], [5.0, 0.0, 2.0, 1.0]])
    y = torch.tensor([1, 0])
    assert torch.equal(margin(scores, y), torch.tensor([-1.0, -3.0]))
    assert torch.equal(margin(scores, y, torch.tensor([3, 3])), torch.tensor([-2.0, -4.0]))
    assert torch.equal(top_targets(scores, y, 2), torch.tensor([[2, 2], [3, 3]]))
    assert top_targets(scores, y, 9).shape == (3, 2)  # capped at C − 1


def test_selection_keeps_fooled_draws_and_the_closest() -> None:
    m = torch.tensor([[-3.0, 0.5], [-1.0, 0.2], [-2.0, -5.0], [-4.0, -6.0]])  # (D = 4, B = 2)
    chosen = selection(m, select=0.25)
    assert chosen[:, 0].tolist() == [False, True, False, False]  # none fooled: the closest one
    assert chosen[:, 1].tolist() == [True, True, False, False]  # every fooled draw


def test_fixed_latents_are_the_same_for_every_call_and_subset() -> None:
    crn = FixedLatents("crn", seed=3)
    a, b = crn(4, 5, 7, CPU, torch.float32), crn(4, 2, 7, CPU, torch.float32)
    assert a.shape == (4, 5, 7) and torch.equal(a[:, :2], b) and a.abs().sum() > 0
    assert torch.equal(FixedLatents("crn", seed=3)(4, 1, 7, CPU, torch.float32), a[:, :1])
    assert FixedLatents("z0")(4, 3, 7, CPU, torch.float32).abs().sum() == 0


def test_representation_toward_moves_to_the_target_classes_example() -> None:
    from carso_cli.evaluation.representation_attack import representation_points

    class Ranking(BlindClassifier):  # class 0 first, then 1: the target of class 0 is 1, of class 1 is 0
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([5.0, 4.0, 0.0, 0.0]) + 0.0 * self.feat(x)

    model = QuantisedCARSO()
    model.classifier = Ranking()
    x = torch.stack([torch.full(SHAPE, 0.5), torch.full(SHAPE, 0.5 + 0.5 * EPS)])  # u = 0 and u = 0.5
    points, sources = representation_points(model, x, torch.tensor([0, 1]), [0, 1], _settings())
    assert sources == ["representation-away", "representation-toward", "code-away", "code-toward"]
    for toward in (points[1], points[3]):
        assert torch.allclose(_u(toward), torch.tensor([0.5, 0.0]), atol=1e-3)  # each reaches the other's u


def test_representation_toward_falls_back_to_another_class_when_the_batch_lacks_the_target() -> None:
    """With 100 or 200 classes a batch holds few of them: no example of the target class → the nearest
    example of any other class (before: no ``toward`` candidate at all); none of another class → −1."""
    from carso_cli.evaluation.representation_attack import target_examples

    class Ranking(BlindClassifier):  # the target of class 0 (k = 1) is class 1, absent from the pool
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([5.0, 4.0, 0.0, 0.0]) + 0.0 * self.feat(x)

    model = QuantisedCARSO()
    model.classifier = Ranking()
    x = torch.stack([torch.full(SHAPE, 0.5), torch.full(SHAPE, 0.5 + 0.5 * EPS)])
    rows = target_examples(model, x, torch.tensor([0, 3]), (x, torch.tensor([0, 3])), "representation", k=1)
    assert rows.tolist() == [1, 0]
    alone = target_examples(model, x, torch.tensor([0, 0]), (x, torch.tensor([0, 0])), "representation", k=1)
    assert alone.tolist() == [-1, -1]


def test_every_attack_runs_on_a_real_carso(smoke_cfg) -> None:
    """Shapes, the ε-ball and [0, 1], the model restored: each attack once on an untrained
    smoke CARSO with tiny budgets (fixed randomness with its ``crn`` mode only: ``z0`` runs in its trap)."""
    from carso_cli.evaluation.fixed_randomness import fixed_randomness_points
    from carso_cli.models import build_classifier, build_purifier
    from carso_cli.models.carso import set_eval_frozen

    torch.manual_seed(0)
    classifier = build_classifier(smoke_cfg)
    carso = CARSO(classifier, build_purifier(smoke_cfg, classifier), samples=2)
    set_eval_frozen(classifier, carso.purifier)
    shape = (smoke_cfg.data.channels, smoke_cfg.data.image_size, smoke_cfg.data.image_size)
    x, y, idx = torch.rand(2, *shape), torch.tensor([0, 1]), [5, 6]
    s = _settings(aa_steps=1, aa_eot=1, pgd_steps=1, pgd_eot=1, square_queries=2, repeats=1)
    for name in stochastic_attacks.ATTACKS:
        if name == "fixed-randomness":
            points, sources = fixed_randomness_points(carso, x, y, s, seed=0, device=CPU, modes=["crn"])
            c = adaptive.Candidates(points, sources)
        else:
            c = adaptive.run_candidates(name, carso, classifier, x, y, idx, s, CPU)
        assert c.points.shape == (len(c.sources), *x.shape), name
        assert (c.points - x).abs().max() <= EPS + 1e-6 and c.points.min() >= 0 and c.points.max() <= 1, name
    assert carso.latent_sampler is standard_normal_sampler and carso.aggregation == "dexp"  # restored


def test_attacks_that_read_carsos_parts_keep_the_wrappers_precision_and_progress(smoke_cfg) -> None:
    """The representation attack and selective EoT call CARSO's parts, not the wrapped model: they still
    run under the evaluation's bf16 autocast (``--precision bfloat16``) and tick its progress bar."""
    from carso_cli.evaluation.batch import Autocast, CountCalls
    from carso_cli.models import build_classifier, build_purifier
    from carso_cli.models.carso import set_eval_frozen

    torch.manual_seed(0)
    classifier = build_classifier(smoke_cfg)
    carso = CARSO(classifier, build_purifier(smoke_cfg, classifier), samples=2)
    set_eval_frozen(classifier, carso.purifier)
    dtypes: list[torch.dtype] = []
    classifier.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    calls = [0]
    model = CountCalls(Autocast(carso, CPU), lambda: calls.__setitem__(0, calls[0] + 1))
    shape = (smoke_cfg.data.channels, smoke_cfg.data.image_size, smoke_cfg.data.image_size)
    x, y = torch.rand(2, *shape), torch.tensor([0, 1])
    s = _settings(pgd_steps=2, pgd_eot=1, repeats=1)
    for name in stochastic_attacks.NEEDS_CARSO:
        calls[0] = 0
        dtypes.clear()
        c = adaptive.run_candidates(name, model, classifier, x, y, [0, 1], s, CPU)
        assert c.sources != ["none"] and calls[0] >= s.pgd_steps, (name, calls[0])
        assert dtypes and all(d == torch.bfloat16 for d in dtypes), (name, set(dtypes))


def test_the_untargeted_margin_follows_the_decoy() -> None:
    """Why one run per target: on the decoy trap the untargeted CW margin goes to u = +1, where nothing breaks."""
    from carso_cli.evaluation.targeted_eot import pgd_cw_eot_points

    model = ToyCARSO(_decoy)
    x, y = torch.full((N, *SHAPE), 0.5), torch.zeros(N, dtype=torch.long)
    s = _settings(pgd_steps=10, pgd_step_size=EPS / 4, pgd_eot=1, seed=0)
    points, sources = pgd_cw_eot_points(model, x, y, range(N), s, n_targets=0, untargeted=True)
    assert sources == ["cw"] and torch.allclose(_u(points[0]), torch.ones(N))
    assert (model(points[0]).argmax(-1) == 0).all()


def test_selective_eot_without_its_selection_is_plain_eot_and_misses(monkeypatch) -> None:
    """The selection is what breaks trap 4: ascending every draw's margin (plain EoT) leaves it robust."""
    from carso_cli.evaluation import selective_eot

    monkeypatch.setattr(selective_eot, "selection", lambda m, select=0.0: torch.ones_like(m, dtype=torch.bool))
    model, classifier = TRAPS["selective-eot"]()
    survivors = _survivors(model, classifier, ["selective-eot"], adaptive.run_candidates, _settings())
    assert survivors.all()
