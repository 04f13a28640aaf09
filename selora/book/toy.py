"""Small, fast problems the theory chapters share: planted-rank regressions and a training loop.

Everything here runs on CPU in seconds. A *planted-rank* task is a frozen linear layer ``W0``
and a target ``y = x (W0 + Δ)ᵀ + b0 (+ noise)`` where the update ``Δ`` has a known rank: a LoRA
adapter of rank ≥ rank(Δ) can fit it exactly, a smaller one cannot. Shapes follow torch's
``nn.Linear``: weights are (out_features, in_features), inputs (N, in_features).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from selora.core.criteria import LAMBDA, FIRatio, FisherScore, criterion_from_config
from selora.core.expansion import INTERVAL, ExpansionController

__all__ = [
    "PlantedTask",
    "PlantedStack",
    "TrainLog",
    "planted_delta",
    "planted_task",
    "planted_stack",
    "train",
    "mse",
    "lora_param_count",
    "LinearShapes",
    "sd15_linear_shapes",
    "score_once",
    "PlantedRun",
    "planted_run",
    "rms_matched_rows",
]


def planted_delta(
    out_features: int,
    in_features: int,
    rank: int,
    *,
    generator: torch.Generator,
    top: float = 1.0,
    bottom: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A random matrix (out, in) of exactly ``rank`` with singular values linearly from top to bottom.

    ``U diag(s) Vᵀ`` with orthonormal U (out, rank), V (in, rank) from QR of Gaussian matrices.
    """
    if not 0 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank={rank}: expected 0 <= rank <= min({out_features}, {in_features})")
    if rank == 0:
        return torch.zeros(out_features, in_features, dtype=dtype)
    u, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator, dtype=torch.float64))
    s = torch.linspace(top, bottom, rank, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


@dataclass
class PlantedTask:
    """A frozen layer, a planted low-rank update and a data set drawn from it.

    base: frozen ``nn.Linear`` (W0, b0); delta: (out, in) planted update;
    x: (N, in) inputs; y: (N, out) targets ``base(x) + x Δᵀ + noise``.
    """

    base: nn.Linear
    delta: Tensor
    x: Tensor
    y: Tensor


def _frozen_linear(in_features: int, out_features: int, generator: torch.Generator, dtype: torch.dtype) -> nn.Linear:
    base = nn.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        bound = in_features**-0.5
        base.weight.uniform_(-bound, bound, generator=generator)
        base.bias.uniform_(-bound, bound, generator=generator)
    base.requires_grad_(False)
    return base


def planted_task(
    in_features: int = 32,
    out_features: int = 32,
    rank: int = 4,
    n: int = 512,
    *,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PlantedTask:
    """Draw a :class:`PlantedTask` reproducibly from ``seed`` (inputs are standard Gaussian)."""
    if n < 1:
        raise ValueError(f"n={n}: expected at least one sample")
    g = torch.Generator().manual_seed(seed)
    base = _frozen_linear(in_features, out_features, g, dtype)
    delta = planted_delta(out_features, in_features, rank, generator=g, dtype=dtype)
    x = torch.randn(n, in_features, generator=g, dtype=dtype)
    with torch.no_grad():
        y = base(x) + x @ delta.T + noise * torch.randn(n, out_features, generator=g, dtype=dtype)
    return PlantedTask(base, delta, x, y)


class PlantedStack(nn.Module):
    """Independent linear layers side by side: input (N, L·d) is split into L chunks of d.

    ``layers[j]`` maps chunk j (N, d) to output chunk j (N, d_out); the output is (N, L·d_out). The
    layers are registered as ``layer0``, ``layer1``, ... so ``selora.core.inject`` can target them.
    """

    def __init__(self, layers: Sequence[nn.Module], width: int):
        super().__init__()
        self.width = width
        for j, layer in enumerate(layers):
            self.add_module(f"layer{j}", layer)
        self.names = [f"layer{j}" for j in range(len(layers))]

    def forward(self, x: Tensor) -> Tensor:
        chunks = x.split(self.width, dim=-1)
        return torch.cat([getattr(self, n)(c) for n, c in zip(self.names, chunks)], dim=-1)


def planted_stack(
    ranks: Sequence[int],
    width: int = 32,
    n: int = 512,
    *,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    out_width: int | None = None,
) -> tuple[PlantedStack, Tensor, Tensor, list[Tensor]]:
    """``len(ranks)`` independent planted tasks ``width -> out_width`` (default square) stacked into one model.

    Returns (model with frozen ``nn.Linear`` layers, x (N, L·width), y (N, L·out_width), deltas).
    """
    out = width if out_width is None else out_width
    tasks = [
        planted_task(width, out, r, n, noise=noise, seed=seed + 1000 * j, dtype=dtype) for j, r in enumerate(ranks)
    ]
    model = PlantedStack([t.base for t in tasks], width)
    return (model, torch.cat([t.x for t in tasks], -1), torch.cat([t.y for t in tasks], -1), [t.delta for t in tasks])


def mse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean squared error of ``model(x)`` against ``y`` (no gradient)."""
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


@dataclass
class TrainLog:
    """What :func:`train` records per step: minibatch losses and, with a controller, its decisions."""

    losses: list[float] = field(default_factory=list)
    decisions: list[tuple[int, list]] = field(default_factory=list)


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    controller: object | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> TrainLog:
    """Minimise the MSE of ``model(x)`` against ``y`` for ``steps`` steps.

    x: (N, in), y: (N, out). Minibatches of ``batch_size`` rows are drawn with a generator seeded
    by ``seed`` (full batch when None). Each step is the trainer's (:class:`selora.train_step.TrainStep`:
    ``loss.backward(); optimizer.step(); controller.step(); optimizer.zero_grad()``, a non-finite
    step skipped). ``on_step(step, model)`` runs after every step (step counts from 1).
    """
    from selora.train_step import TrainStep, squared_error

    train_step = TrainStep(model, optimizer, squared_error, controller=controller)
    g = torch.Generator().manual_seed(seed)
    log = TrainLog()
    for step in range(1, steps + 1):
        if batch_size is None:
            xb, yb = x, y
        else:
            idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
            xb, yb = x[idx], y[idx]
        result = train_step((xb, yb), step - 1)
        if result.decisions:
            log.decisions.append((step, result.decisions))
        log.losses.append(float(result.loss))
        if on_step is not None:
            on_step(step, model)
    return log


def lora_param_count(in_features: int, out_features: int, rank: int) -> int:
    """Trainable parameters of a rank-``rank`` adapter on an (in → out) layer: r·(in + out)."""
    return rank * (in_features + out_features)


@dataclass
class LinearShapes:
    """Every ``nn.Linear`` of a model as (name, in_features, out_features), and its total size."""

    linears: list[tuple[str, int, int]]
    total_params: int


def sd15_linear_shapes(component: str = "unet") -> LinearShapes:
    """The linear layers of Stable Diffusion v1.5's UNet or text encoder, and its parameter count.

    ``component`` is ``"unet"`` (UNet2DConditionModel with SD-1.5's config) or
    ``"text-encoder"`` (CLIP ViT-L/14 text model). The models are built on the meta device from
    their configs: no weights, no download, no memory.
    """
    from selora.sd15 import sd15_text_encoder, sd15_unet

    builders = {"unet": sd15_unet, "text-encoder": sd15_text_encoder}
    if component not in builders:
        raise ValueError(f"component={component!r}: expected 'unet' or 'text-encoder'")
    with torch.device("meta"):
        model = builders[component]()
    return LinearShapes(
        [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)],
        sum(p.numel() for p in model.parameters()),
    )


def score_once(
    model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None
) -> tuple[dict[str, FisherScore], dict[str, Tensor]]:
    """Score every SeLoRA layer of ``model`` on one batch with the paper's FI-Ratio, without expanding anything.

    Runs one forward/backward of the MSE of ``model(x)`` against ``y`` (x: (N, ...), y: (N, ...))
    under an :class:`selora.ExpansionController` that tests on its first step and may not grow
    (``max_rank=1``). Returns ``({name: FisherScore (fi_orig, fi_exp, ratio)}, {name: the candidate K (1, in)
    it scored})``;
    gradients are cleared afterwards and the model is left as it was.
    """
    ctl = ExpansionController(model, None, FIRatio(1.0), interval=1, max_rank=1, generator=generator)
    try:
        candidates = {name: c.K.detach().clone() for name, c in ctl.captures.items()}
        ((model(x) - y) ** 2).mean().backward()
        scores = {d.name: d.score for d in ctl.step()}
    finally:
        ctl.close()
        model.zero_grad(set_to_none=True)
    return scores, candidates


@dataclass
class PlantedRun:
    """Outcome of :func:`planted_run`: ranks after every test step, final loss, adapter size.

    test_steps: steps at which the controller tested; ranks: layer → rank after each of those
    steps; decisions: every test step's decisions; losses: minibatch loss per step.
    """

    test_steps: list[int]
    ranks: dict[str, list[int]]
    final_mse: float
    trainable: int
    decisions: list[tuple[int, list]]
    losses: list[float]


def planted_run(
    planted: Sequence[int],
    *,
    kind: str = "selora",
    rank: int | Sequence[int] = 1,
    threshold: float = LAMBDA,
    interval: int = INTERVAL,
    max_rank: int | None = None,
    steps: int = 1200,
    width: int = 32,
    n: int = 1024,
    noise: float = 0.0,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
    init: Callable[[nn.Module], Callable] | None = None,
    out_width: int | None = None,
    criterion: str = FIRatio.name,
    alpha: float = 0.001,
    window: int = 1,
) -> PlantedRun:
    """Train adapters on a :func:`planted_stack` with planted ranks ``planted`` (layers ``width -> out_width``).

    ``kind="selora"``: every layer starts at rank ``rank`` and an ExpansionController
    (``interval``, ``max_rank``) grows it by ``criterion`` (a name in :data:`selora.core.criteria.CRITERIA`:
    ``threshold`` for the paper's, ``alpha`` and ``window`` for the signal test).
    ``kind="lora"``: fixed ranks, ``rank`` an int or one rank per layer. ``init(layer)`` may return
    a row initialiser for K (``selora.core.layers.RowInit``) to install on each SeLoRA layer. Adam, MSE, minibatches.
    """
    from selora.core.inject import KINDS
    from selora.core.layers import SeLoRALinear, num_trainable, trainable_parameters

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    model, x, y, _ = planted_stack(planted, width, n, noise=noise, seed=seed, out_width=out_width)
    per_layer = [rank] * len(planted) if isinstance(rank, int) else list(rank)
    if len(per_layer) != len(planted):
        raise ValueError(f"rank: expected {len(planted)} ranks, got {len(per_layer)}")
    gen = torch.Generator().manual_seed(seed)
    cls = KINDS[kind]
    layers = {name: cls(getattr(model, name), rank=r, generator=gen) for name, r in zip(model.names, per_layer)}
    for name, layer in layers.items():
        setattr(model, name, layer)
    if init is not None:
        for layer in layers.values():
            layer.init = init(layer)
    opt = torch.optim.Adam(trainable_parameters(model), lr=lr)
    ctl = None
    if issubclass(cls, SeLoRALinear):
        settings = SimpleNamespace(
            criterion=criterion, threshold=threshold, interval=interval, signal_alpha=alpha, signal_window=window
        )
        ctl = ExpansionController(
            model,
            opt,
            criterion_from_config(settings),
            interval=interval,
            max_rank=max_rank,
            generator=torch.Generator().manual_seed(seed + 1),
        )
    test_steps, ranks = [0], {name: [layer.rank] for name, layer in layers.items()}

    def record(step: int, m: nn.Module) -> None:
        if step % interval == 0:
            test_steps.append(step)
            for name, layer in layers.items():
                ranks[name].append(layer.rank)

    log = train(model, x, y, opt, steps, batch_size=batch_size, seed=seed, controller=ctl, on_step=record)
    return PlantedRun(test_steps, ranks, mse(model, x, y), num_trainable(model), log.decisions, log.losses)


def rms_matched_rows(layer: nn.Module) -> Callable[[int, int, torch.Generator | None], Tensor]:
    """A row initialiser for K that rescales Kaiming-uniform rows to the RMS row norm of ``layer.lora_A``.

    This book's exploration (not the paper's method): with K as large as an average existing row,
    ``‖K‖² / ‖A‖²_F = 1 / r`` whatever training did to the scale of A.
    """
    from selora.core.layers import kaiming_rows

    def init(rows: int, in_features: int, generator: torch.Generator | None = None) -> Tensor:
        K = kaiming_rows(rows, in_features, generator)
        A = layer.lora_A.detach().float().cpu()
        target = A.norm() / A.shape[0] ** 0.5
        return K * (target / K.norm(dim=1, keepdim=True))

    return init
