"""Many runs of one shape trained as one: the stacked engine that ``run_grid`` uses by default.

A *stack* is R runs whose configs agree on every shape (model, data, batch size, steps, schedule) and on
which constraint arms are on, and differ only in seed (initial weights, batch order), constraint weights and
learning rate. Each run is still a :class:`train._Training` (its own seed, model, optimiser state, history,
checkpoints, cache folder and result files: nothing downstream can tell a stacked run from a solo one). Only
the optimiser step is shared: the R models' parameters are stacked on a leading run axis
(``torch.func.stack_module_state``) and one ``vmap(functional_call)`` of the single-run :class:`Encoder`
computes the R losses, so the model file remains the one definition. Per run inside the step:

* its batch (indices from its own seed), its constraint weights (tensors under ``vmap``), its learning rate;
* gradient clipping by its own norm and AdamW with its own moments, written out below with torch's AdamW
  formula (a leading-axis learning rate is not something ``torch.optim`` takes);
* divergence: a run whose loss is not finite is frozen on the device (``torch.where`` keeps its weights and
  moments) and recorded as ``diverged`` at its step when the stack next evaluates; the others go on;
* an arm's trained state (the InfoNCE critic, CLUB's q): its networks stack too, and what its own step
  minimises (on detached head outputs) joins the model's backward pass, its Adam stepped per run after it.

Nothing is read back from the device between evaluations: running losses accumulate as tensors.

Which runs stack (:func:`stack_key` is None otherwise, and the run trains alone exactly as before): softmax
attention without Hopfield memory (entmax's and the Hopfield iteration's data-dependent control flow do not
run under ``vmap``), no dropout (random draws under ``vmap`` would differ from the same run alone), and no arm
with a trained state that does not declare its ``objective`` (the registry's MI arm does). Runs that stack
are equal to the same runs trained alone up to float rounding (the batched matmuls sum in another order,
attention takes the explicit path, the batch is padded to the stack's longest sequence): tested per step in
``tests/test_stack.py``; which runs shared the stack is recorded in ``result.json`` (``info.stack``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from . import arms as arms_mod
from .config import RunConfig, run_hash
from .constraints import no_diagnostics


def stack_key(cfg: RunConfig) -> str | None:
    """What runs must share to train in one stack (a JSON string), or None when ``cfg`` trains alone."""
    m, c = cfg.model, cfg.constraints
    if m.attention != "softmax" or m.hopfield_patterns or m.dropout:
        return None
    weights = c.active()
    if any(arms_mod.get(name).state is not None and arms_mod.get(name).objective is None for name in weights):
        return None
    d = cfg.to_dict()
    d.pop("seed")
    d["train"].pop("lr")
    for name in arms_mod.constraint_names():  # the weight may differ; whether the arm is on may not
        d["constraints"][name] = name in weights
    return json.dumps(d, sort_keys=True)


def plan(configs: Sequence[RunConfig], n_workers: int, max_runs: int | None) -> list[list[RunConfig]]:
    """Partition ``configs`` into stacks (lists; a list of one trains alone), in a deterministic order.

    A stack holds at most ``max_runs`` runs, and at most ``ceil(len(configs) / n_workers)`` so that every
    worker gets work: on a CPU, runs in parallel on separate cores beat a bigger stack on one core.
    """
    groups: dict[str, list[RunConfig]] = {}
    alone: list[list[RunConfig]] = []
    for cfg in configs:
        key = stack_key(cfg)
        if key is None:
            alone.append([cfg])
        else:
            groups.setdefault(key, []).append(cfg)
    cap = max(1, math.ceil(len(configs) / max(1, n_workers)))
    if max_runs:
        cap = min(cap, max_runs)
    stacks = []
    for members in groups.values():
        n_chunks = math.ceil(len(members) / cap)
        size = math.ceil(len(members) / n_chunks)  # even chunks: 9 runs at cap 8 are 5 + 4, not 8 + 1
        stacks += [members[i:i + size] for i in range(0, len(members), size)]
    # Most work first, runs alone included (longest processing time first): the pool hands items out as
    # workers free up, so the last ones handed out are the short ones and no core idles behind a long tail.
    # Ordering by the number of runs alone left 06's capacity grid (stacks of 3 of models up to 4x the
    # default's cost) finishing on one core.
    return sorted(stacks + alone, key=lambda s: len(s) * run_cost(s[0]), reverse=True)


# A training step's cost relative to softmax attention, measured at the default size (one global layer of two,
# batch 16, T 30, one CPU thread): 1.5-entmax sorts every row, learned-alpha entmax bisects it 30 times.
# Routing and Hopfield memory measured 1.06x and 1.12x: left out.
_ATTENTION_COST = {"softmax": 1.0, "entmax15": 1.34, "entmax_alpha": 2.7}


def run_cost(cfg: RunConfig) -> float:
    """Multiply-adds of one run's training, roughly: steps x batch x tokens x (the projections and the FFN of
    every layer, plus attention scores and mixing), times the measured factor of its attention. Only for
    ordering work items."""
    m, T = cfg.model, cfg.model.max_len
    per_token = m.n_layers * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff + 2 * T * m.d_model)
    return float(cfg.train.steps * cfg.train.batch_size * T * per_token) * _ATTENTION_COST.get(m.attention, 1.0)


def default_max_runs(cfg: RunConfig) -> int | None:
    """The most runs a stack of ``cfg``'s shape may hold: ``$DISENTANGLE_MAX_STACK`` if set; on a CPU no cap
    (a stack's cost is linear in R there, and a stack is no bigger than its share of the cores' runs); on
    CUDA as many runs as half of the device's free memory holds, at an estimated cost per run: weights,
    gradients, two moments and the update's temporaries (8 copies of the parameters, float32) plus the
    activations the backward pass keeps (about 24 floats per token and layer of width d_model or d_ff, and
    3 per attention entry). An estimate, not a measurement: no GPU was lent while this was written."""
    env = os.environ.get("DISENTANGLE_MAX_STACK")
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"DISENTANGLE_MAX_STACK={env!r} must be a positive integer (runs per stack)")
        return value
    device = torch.device(cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None
    m, B, T = cfg.model, cfg.train.batch_size, cfg.model.max_len
    n_params = m.n_layers * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff) + 256 * m.d_model  # + embeddings, roughly
    acts = B * T * m.n_layers * (24 * max(m.d_model, m.d_ff) + 3 * m.n_heads * T)
    per_run = 4 * (8 * n_params + acts)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(0.5 * free // per_run))


class _Objective(torch.nn.Module):
    """One run's loss as a module, for ``functional_call``: what ``_Training.step`` computes, CE + Σ weight ×
    raw constraint term (the weights are inputs), and, for arms with a trained state (the MI estimator), what
    that state's own step minimises. Holds parameterless ("meta") copies of the single-run Encoder and of the
    states' estimator networks, into which the stacked parameters are swapped."""

    def __init__(self, model: torch.nn.Module, constraints):
        super().__init__()
        self.model = copy.deepcopy(model).to("meta")
        # A shallow copy of the run's Constraints whose states hold the copies registered here, so that the
        # constraint losses read the swapped-in estimator parameters too.
        self.constraints = copy.copy(constraints)
        self.constraints.states = {}
        self.estimators = torch.nn.ModuleDict()
        for name, state in constraints.states.items():
            clone = copy.copy(state)
            clone.estimator = self.estimators[name] = copy.deepcopy(state.estimator).to("meta")
            self.constraints.states[name] = clone
        # Always the explicit attention path: vmap batches its matmuls and softmax, whereas fused attention has
        # no batching rule and runs once per run (measured on the full profile's model: 270 kernels a step for
        # a stack of 8 either way of R with it, 522 and growing with R through fused attention; 206 alone).
        self.captures = constraints.captures | {"attn"}

    def forward(self, weights, tokens, padding_mask, segments, answers):
        out = self.model(tokens, padding_mask, capture=self.captures, segments=segments, check=False)
        ce = F.cross_entropy(out.logits.float(), answers)
        raw = self.constraints.raw(out, padding_mask, self.model)
        total = torch.zeros((), device=ce.device)
        for name, value in raw.items():
            w = weights[name] if name in weights else self.constraints.weight(name, self.model)
            total = total + w * value
        # The estimators' objectives read detached head outputs, and the loss reads frozen estimators, so one
        # backward of their sum gives each parameter exactly the gradient of its own optimiser's step.
        states = self.constraints.objectives(out, padding_mask, self.model)
        return ce + total, ce, raw, sum(states.values(), torch.zeros((), device=ce.device))


class _Group:
    """Stacked parameters (leaves (R, ...)) under one Adam(W): the models' (AdamW, per-run learning rates,
    clipped) or an arm state's estimators' (their own Adam). Moments start from each run's own optimiser
    state, so a resumed run continues exactly."""

    def __init__(self, modules: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer], prefix: str, device):
        params, buffers = stack_module_state(modules)  # leaves (R, ...), require grad
        self.prefix, self.params, self.buffers = prefix, params, buffers
        self.modules, self.optimizers = modules, optimizers
        group = optimizers[0].param_groups
        decayed = {id(p) for g in group if g.get("weight_decay") for p in g["params"]}
        named0 = dict(modules[0].named_parameters())
        self.weight_decay = {n: (next(g["weight_decay"] for g in group if any(q is named0[n] for q in g["params"]))
                                 if id(named0[n]) in decayed else 0.0) for n in params}
        self.betas, self.eps = group[0]["betas"], group[0]["eps"]
        self.exp_avg, self.exp_avg_sq = {}, {}
        for name in params:
            states = [opt.state.get(dict(m.named_parameters())[name], {}) for m, opt in zip(modules, optimizers)]
            if all("exp_avg" in st for st in states):
                self.exp_avg[name] = torch.stack([st["exp_avg"] for st in states]).to(device)
                self.exp_avg_sq[name] = torch.stack([st["exp_avg_sq"] for st in states]).to(device)
            else:
                self.exp_avg[name] = torch.zeros_like(params[name], requires_grad=False)
                self.exp_avg_sq[name] = torch.zeros_like(params[name], requires_grad=False)

    def call_args(self) -> dict[str, torch.Tensor]:
        return {f"{self.prefix}{k}": v for k, v in {**self.params, **self.buffers}.items()}

    @torch.no_grad()
    def adamw(self, grads: dict[str, torch.Tensor], lr: torch.Tensor, live: torch.Tensor, t: int) -> None:
        """torch.optim.AdamW's update at step t, per run (lr (R,)); runs not ``live`` keep weights and moments."""
        beta1, beta2 = self.betas
        bias1, bias2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
        for name, p in self.params.items():
            g = grads[name]
            shape = (-1, *[1] * (p.dim() - 1))
            keep, lr_r = live.view(shape), lr.view(shape)
            m = self.exp_avg[name].lerp(g, 1 - beta1)
            v = self.exp_avg_sq[name] * beta2 + (1 - beta2) * g * g
            new = p * (1 - lr_r * self.weight_decay[name]) - (lr_r / bias1) * m / (v.sqrt() / bias2_sqrt + self.eps)
            p.copy_(torch.where(keep, new, p))
            self.exp_avg[name] = torch.where(keep, m, self.exp_avg[name])
            self.exp_avg_sq[name] = torch.where(keep, v, self.exp_avg_sq[name])

    @torch.no_grad()
    def write_back(self, i: int, steps: int, device) -> None:
        """Run i's slice into its own module and optimiser state (as torch's Adam(W) would hold it)."""
        named = dict(self.modules[i].named_parameters())
        opt = self.optimizers[i]
        fused = any(g.get("fused") for g in opt.param_groups)
        for name in self.params:
            named[name].copy_(self.params[name][i])
            if steps:
                step = torch.tensor(float(steps), device=device if fused else "cpu")
                opt.state[named[name]] = {"step": step, "exp_avg": self.exp_avg[name][i].clone(),
                                          "exp_avg_sq": self.exp_avg_sq[name][i].clone()}


class _Stack:
    """R :class:`train._Training` runs at the same step, stepped as one. Built from runs already set up (and
    resumed), so each run's initial weights and state are exactly those it would have alone."""

    def __init__(self, runs: list):
        self.runs = runs
        r0 = runs[0]
        steps = {r.step_no for r in runs}
        if len(steps) != 1:
            raise ValueError(f"a stack's runs must be at one step, got {sorted(steps)}")
        self.step_no = steps.pop()
        self.device, self.tc = r0.device, r0.tc
        self.constraints = r0.constraints  # the structure (arms, layers, captures) is shared; weights are per run
        self.captures = self.constraints.captures
        # The single-run Encoder is the definition: the objective holds a parameterless copy of it.
        self.objective = _Objective(r0.model, self.constraints)
        self.model = _Group([r.model for r in runs], [r.opt for r in runs], "model.", self.device)
        self.params, self.buffers = self.model.params, self.model.buffers
        self.states = {name: _Group([r.constraints.states[name].estimator for r in runs],
                                    [r.constraints.states[name].optimizer for r in runs], f"estimators.{name}.", self.device)
                       for name in self.constraints.states}
        # (R,) weight of every active constraint, per run (0 = off for that run)
        self.weights = {n: torch.tensor([r.constraints.weights.get(n, 0.0) for r in runs], device=self.device)
                        for n in self.constraints.weights}
        R = len(runs)
        self.alive = torch.ones(R, dtype=torch.bool, device=self.device)  # not diverged, not finished
        self.diverged_at = torch.full((R,), -1, dtype=torch.long, device=self.device)
        self.done = [False] * R  # finished and written (diverged, stopped early, or at the last step)
        self.sums: dict[str, torch.Tensor] = {}
        self.n_sums = 0
        self._losses = vmap(self._one_run, randomness="error")
        self.info = {"runs": R, "run_ids": [r.run_id for r in runs]}
        self.last: dict[str, torch.Tensor] = {}  # the step's per-run values, for tests

    # ------------------------------------------------------------------ the step

    def _one_run(self, params, weights, tokens, padding_mask, segments, answers):
        with no_diagnostics():  # diagnostics are Python floats: not under vmap
            return functional_call(self.objective, params, (weights, tokens, padding_mask, segments, answers))

    def _call_params(self) -> dict[str, torch.Tensor]:
        out = self.model.call_args()
        for group in self.states.values():
            out.update(group.call_args())
        return out

    def losses(self, b: dict[str, torch.Tensor]):
        """(loss, ce, raw terms, estimators' objective), each (R,), of batch ``b`` (tensors (R, B, ...))."""
        with self.runs[0].autocast():
            return self._losses(self._call_params(), self.weights, b["tokens"], b["padding_mask"], b["segments"], b["answers"])

    def _batch(self) -> dict[str, torch.Tensor]:
        from .train import _batch_indices

        train = self.runs[0].data.splits["train"]
        idx = torch.stack([_batch_indices(self.step_no, len(train), r.tc.batch_size, r.cfg.seed, r.tc.batch_order) for r in self.runs])
        R, B = idx.shape
        b = train.batch(idx.reshape(-1))  # trimmed to the longest sequence of all R batches
        return {k: v.reshape(R, B, *v.shape[1:]).to(self.device) for k, v in b.items()}

    def step(self) -> None:
        """One optimiser step of every live run (and of its estimators)."""
        from .train import lr_at

        loss, ce, raw, state_objective = self.losses(self._batch())
        ok = torch.isfinite(loss)
        self.diverged_at = torch.where(self.alive & ~ok, self.step_no, self.diverged_at)
        live = self.alive & ok
        groups = [self.model, *self.states.values()]
        for group in groups:
            for p in group.params.values():
                p.grad = None
        # Each run's parameters meet only its own loss, so the others' gradients are untouched by a non-finite
        # run; that run's own (NaN) gradients are discarded by the update's mask.
        (torch.where(ok, loss, 0.0).sum() + torch.where(ok, state_objective, 0.0).sum()).backward()
        grads = {n: p.grad for n, p in self.params.items()}
        if self.tc.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_ of the model, by each run's own total norm
            norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()])  # (L, R)
            coef = (self.tc.grad_clip / (torch.linalg.vector_norm(norms, dim=0) + 1e-6)).clamp(max=1.0)
            grads = {n: g * coef.view(-1, *[1] * (g.dim() - 1)) for n, g in grads.items()}
        t = self.step_no + 1
        self.model.adamw(grads, torch.tensor([lr_at(self.step_no, r.tc) for r in self.runs], device=self.device), live, t)
        for name, group in self.states.items():
            lr = torch.tensor([r.constraints.states[name].optimizer.param_groups[0]["lr"] for r in self.runs], device=self.device)
            group.adamw({n: p.grad for n, p in group.params.items()}, lr, live, t)
        self.alive = live
        values = {"loss": loss.detach(), "ce": ce.detach(), **{k: v.detach() for k, v in raw.items()}}
        for k, v in values.items():
            v = torch.where(live, v.float(), 0.0)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.last = values
        self.n_sums += 1
        self.step_no += 1

    # ------------------------------------------------------------------ per-run bookkeeping

    def write_back(self, i: int) -> None:
        """Run i's slice of the stack into its own model, estimators and optimiser states, so :class:`_Training`'s
        evaluation, checkpoint and result files see exactly what a solo run of it would hold."""
        for group in (self.model, *self.states.values()):
            group.write_back(i, self.step_no, self.device)

    def evaluate(self, share: float) -> None:
        """At an evaluation step (the same for all runs): each live run's validation row, early stopping and
        checkpoint; runs that diverged, stopped or reached the last step are finished (their files written)."""
        alive = self.alive.tolist()
        diverged_at = self.diverged_at.tolist()
        sums = {k: v.tolist() for k, v in self.sums.items()}
        for i, run in enumerate(self.runs):
            if self.done[i]:
                continue
            run.elapsed += share  # its share of the stack's time; _Training adds perf_counter() - t0 to it
            run.t0 = time.perf_counter()
            run.info["stack"] = self.info
            if not alive[i]:  # diverged since the last evaluation: it stopped before that step's update
                run.step_no = diverged_at[i]
                self.write_back(i)
                run._diverged()
                self._finish(i)
                continue
            run.step_no = self.step_no
            self.write_back(i)
            run.running = {k: v[i] for k, v in sums.items()}
            run.n_running = self.n_sums
            stop = run.evaluate_and_checkpoint()
            if stop or run.step_no >= run.tc.steps:
                self._finish(i)
        self.sums, self.n_sums = {}, 0

    def _finish(self, i: int) -> None:
        run = self.runs[i]
        run.t0 = time.perf_counter()  # elapsed already holds this run's share of the stack's time
        self.results[i] = run.finish()
        self.done[i] = True
        self.alive[i] = False

    def fit(self) -> list:
        """Train every run to its end; the results in the runs' order."""
        self.results: list = [None] * len(self.runs)
        steps = self.tc.steps
        for r in self.runs:
            r.model.train()
        t0 = time.perf_counter()
        while self.step_no < steps and not all(self.done):
            self.step()
            if self.step_no % self.tc.eval_every == 0 or self.step_no == steps:
                now = time.perf_counter()
                # each live run's share of the stack's wall time since the last evaluation
                n_live = max(1, sum(not d for d in self.done))
                self.evaluate((now - t0) / n_live)
                t0 = now
        for i in range(len(self.runs)):  # runs still open after the loop (e.g. steps == 0)
            if not self.done[i]:
                self._finish(i)
        return self.results


def train_stack(cfgs: Sequence[RunConfig], cache_dir: str | Path, threads: int | None) -> list[tuple[str, str | None]]:
    """Train (or load) the runs of one stack; ``(run_id, error)`` per config, like ``run_grid``'s workers.

    Each run takes its run lock (in id order, so two overlapping stacks cannot deadlock) and loads or resumes
    as a solo run would; runs resumed at different steps (a stack killed between two checkpoint writes)
    train as separate stacks, one per step.
    """
    from . import train as T

    cache = Path(cache_dir)
    ids = {run_hash(c): c for c in cfgs}
    with ExitStack() as locks:
        for run_id in sorted(ids):
            locks.enter_context(T._run_lock(cache, run_id))
        todo = {run_id: cfg for run_id, cfg in ids.items() if T._load_finished(cfg, run_id, cache / run_id) is None}
        if not todo:
            return [(i, None) for i in ids]
        first = next(iter(todo.values()))
        data = T.load_data(first.data, cache)
        with T._cpu_settings(threads) if T.resolve_device(first.train.device).type == "cpu" else ExitStack():
            runs = [T._prepare(cfg, run_id, cache / run_id, cache, data) for run_id, cfg in todo.items()]
            by_step: dict[int, list] = {}
            for r in runs:
                by_step.setdefault(r.step_no, []).append(r)
            for group in by_step.values():
                if len(group) == 1:  # nothing to stack with: the solo loop
                    T._loop(group[0], progress=False)
                else:
                    _Stack(group).fit()
    return [(i, None) for i in ids]


__all__ = ["plan", "stack_key", "train_stack", "default_max_runs"]
