#!/usr/bin/env python
"""How fast and how lean a meta-step is: imaml's benchmark (see BENCHMARKS.md for results).

    python scripts/benchmark.py                 # full suite on the CPU (about 15 minutes on 2 cores)
    python scripts/benchmark.py --quick         # a smoke test of every part, well under a minute
    python scripts/benchmark.py --device cuda   # on a GPU: timings synchronised, peak allocated memory
    python scripts/benchmark.py --solvers       # only CG against the Neumann series (add --quick: seconds)
    python scripts/benchmark.py --authors ../shared/peers           # also the authors' code, same run
    python scripts/benchmark.py --authors ../shared/peers --only-authors   # just that comparison

``--authors DIR`` takes the folder holding the authors' code (``imaml_dev/``) and ``time_authors.sh``
(or ``imaml_dev`` itself), times their Omniglot example at two run lengths in this run, and prints
the ratio of their seconds per meta-step (the difference of the two, per step) to ours. Every
timed case also reports its FLOPs per meta-step, counted by ``torch.utils.flop_counter.FlopCounterMode``
(matrix products and convolutions only; elementwise work is not counted), the GFLOP/s it achieved
and that as a fraction of this machine's matrix-product throughput, measured at the start of the
run (float32, and bfloat16 where the device has it); FLOPs over that throughput is the case's floor.

Every timed case runs in a fresh subprocess, so that its peak resident memory (CPU) is its own.
Timing cases use random tensors of the right shapes; episode sampling uses the real Omniglot
through imaml_cli.data when it is at ../shared/data/omniglot (relative to the repository), else
generated images of the same shape. Results: a table on stdout, JSON (``--json``) and the
inner-step scaling plot (``--plot``, needs matplotlib: ``pip install imaml[plot]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
GIB = 1024 ** 3

# Meta-batch shapes. Omniglot 5-way 1-shot as in the authors' example command (meta-batch 32, one
# support and one query image per class, 16 inner steps, λ = 2, 5 CG steps); the others as in
# conf/experiment. ``hf_steps``: iMAML-HF's Newton iterations, the presets' inner_steps.hf.
CASES = {
    "omniglot_5w1s": dict(model="omniglot_conv", ways=5, shots=1, queries=1, tasks=32, steps=16, hf_steps=5, lr=0.1,
                          lam=2.0),
    "omniglot_5w1s_q15": dict(model="omniglot_conv", ways=5, shots=1, queries=15, tasks=32, steps=16, hf_steps=5,
                              lr=0.1, lam=2.0),
    "omniglot_20w1s": dict(model="omniglot_conv", ways=20, shots=1, queries=15, tasks=16, steps=25, hf_steps=5, lr=0.1,
                           lam=2.0),
    "miniimagenet_5w1s": dict(model="miniimagenet_conv", ways=5, shots=1, queries=15, tasks=4, steps=10, hf_steps=5,
                              lr=0.01, lam=0.5),
    "sinusoid": dict(model="sinusoid_mlp", ways=1, shots=10, queries=10, tasks=25, steps=5, hf_steps=3, lr=0.01,
                     lam=1.0),
}
# Run lengths (meta-steps) at which the authors' example is timed; their difference cancels start-up.
AUTHORS_STEPS = (3, 13)
AUTHORS_QUICK_STEPS = (1, 3)
METHODS = ("imaml-gd", "imaml-hf", "maml", "fomaml", "reptile")
SCALING_STEPS = (5, 10, 20, 40, 80, 160)
# The speed switches, each on top of the previous line; the last is the default.
LEVERS = [
    ("vmap + native conv (the plain path)", dict(conv_impl="native", fused=False, hvp_mode="forward_over_reverse")),
    ("+ conv_impl=im2col", dict(fused=False, hvp_mode="forward_over_reverse")),
    ("+ hvp_mode=reverse_over_reverse (cached)", dict(fused=False, hvp_mode="reverse_over_reverse")),
    ("+ fused=True", dict(task_groups=1)),
    ("+ task_groups=auto (default)", dict()),
    ("+ precision=bf16 (not default)", dict(precision="bf16")),
    ("fused, plain GD inner steps (inner_solver.backtrack=false)", dict(backtrack=False)),
]


# ----------------------------------------------------------------------------------- worker side

def make_tasks(case: dict, device, dtype=None):
    """Random inputs of the case's shapes (a fixed seed)."""
    import torch

    from imaml_cli.data import TaskBatch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    t, n = case["tasks"], case["ways"]
    if case["model"] == "sinusoid_mlp":
        def draw(k):
            x = torch.rand(t, k, 1, generator=g) * 10 - 5
            return x, torch.sin(x) * 2
        support, query = draw(case["shots"]), draw(case["queries"])
    else:
        shape = (1, 28, 28) if case["model"] == "omniglot_conv" else (3, 84, 84)

        def draw(k):
            return (torch.randn(t, n * k, *shape, generator=g),
                    torch.arange(n).repeat_interleave(k).expand(t, -1).contiguous())
        support, query = draw(case["shots"]), draw(case["queries"])
    return TaskBatch(*(x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in (*support, *query)))


def make_learner(case: dict, method: str, options: dict, device, dtype=None):
    import torch

    from imaml_cli.meta.algorithms import MetaLearner
    from imaml_cli.meta.inner import GradientDescent, NewtonCG
    from imaml_cli.meta.task import TaskModel
    from imaml_cli.models import build_model

    options = dict(options)
    torch.manual_seed(0)
    outputs = 1 if case["model"] == "sinusoid_mlp" else case["ways"]
    network = build_model(case["model"], outputs, conv_impl=options.pop("conv_impl", "im2col"))
    network = network.to(device, dtype or torch.float32)
    kind = "regression" if case["model"] == "sinusoid_mlp" else "classification"
    if method == "imaml-hf":
        # The presets' setting: hf_steps Newton iterations of 5 CG products and a 6-point line search.
        inner = NewtonCG(case["hf_steps"], 5, options.pop("newton_hvp_mode", "reverse_over_reverse"))
    else:
        # iMAML-GD's default inner loop is the monotone (backtracking) one; the others take plain steps.
        inner = GradientDescent(case["steps"], case["lr"], options.pop("backtrack", method == "imaml-gd"))
    algorithm = {"imaml-gd": "imaml", "imaml-hf": "imaml"}.get(method, method)
    # perf.task_groups=auto, as the app resolves it.
    options.setdefault("task_groups", torch.get_num_threads() if torch.device(device).type == "cpu" else 1)
    return MetaLearner(TaskModel(network, kind), algorithm, inner, lam=case["lam"], cg_steps=options.pop("cg_steps", 5),
                       **options)


def current_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def flop_counter():
    """torch's FLOP counter, also counting the in-place batched products of the fused passes
    (``baddbmm_``), which it otherwise skips: about half of a fused Hessian-vector product's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def baddbmm_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
        batch, m, k = a_shape
        return 2 * batch * m * k * b_shape[-1]

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: baddbmm_flops})


def run_worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    case, method = spec["case"], spec["method"]
    learner = make_learner(case, method, spec.get("options", {}), device)
    tasks = make_tasks(case, device)
    theta = learner.model.parameters()
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    base_rss = current_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times, cpu = [], []
    started = time.perf_counter()
    for i in range(spec["warmup"] + spec["reps"]):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        learner.meta_gradient(theta, tasks)
        sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        # Slow cases take fewer repetitions, so that the whole suite stays within its budget.
        if i >= spec["warmup"] and time.perf_counter() - started > spec.get("budget_s", 1e9) and len(times) >= 2:
            break
    # Below 1, the machine's other work took cores from this case while it was being timed.
    utilization = sum(cpu) / (sum(times) * torch.get_num_threads())
    # After the timing (counting slows the step down), and in one group: the counter sees only
    # the ops of the thread that entered it.
    with flop_counter() as counter:
        dataclasses.replace(learner, task_groups=1).meta_gradient(theta, tasks)
    result = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
              "cpu_utilization": utilization, "flops": counter.get_total_flops(),
              "tasks_per_s": case["tasks"] / statistics.median(times), "base_rss_bytes": base_rss,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        result["base_cuda_bytes"] = base_cuda
    return result


def run_throughput(spec: dict) -> dict:
    """The device's matrix-product throughput in GFLOP/s: the best of repeated square products,
    float32 and, where the device has it, bfloat16 (the floor every case is measured against)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    n = 4096 if device.type == "cuda" else 2048
    dtypes = {"float32": torch.float32}
    if bf16_products(device):
        dtypes["bfloat16"] = torch.bfloat16
    out = {"size": n}
    for name, dtype in dtypes.items():
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        best = float("inf")
        for _ in range(spec["reps"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflops"] = 2 * n ** 3 / best / 1e9
    return out


def bf16_products(device) -> bool:
    """Whether the device multiplies bfloat16 matrices in hardware (CPU: AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run_accuracy(spec: dict) -> dict:
    """How far reduced precision moves the meta-gradient, and how far rounding alone can move it."""
    import torch

    from imaml_cli.meta import tree
    from imaml_cli.data import TaskBatch
    from imaml_cli.meta.precision import matmul_precision

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    case = spec["case"]

    def relative(a, b):
        return (tree.norm(tree.add(a, b, -1.0)) / tree.norm(b)).item()

    def learner(dtype, **options):
        return make_learner(case, "imaml-gd", options, "cpu", dtype)

    tasks = make_tasks(case, "cpu")
    if spec.get("omniglot") and OMNIGLOT.is_dir():
        from imaml_cli.data import make_episode_source

        source = make_episode_source("omniglot", "train", root=OMNIGLOT, ways=case["ways"], shots=case["shots"],
                                     queries=case["queries"], device="cpu")
        tasks = source.sample(case["tasks"], torch.Generator().manual_seed(0))
    tasks64 = TaskBatch(*(x.double() if x.is_floating_point() else x for x in tasks))
    exact = learner(torch.float64)
    theta64 = exact.model.parameters()
    theta = {k: v.float() for k, v in theta64.items()}
    reference, _ = exact.meta_gradient(theta64, tasks64)
    reference = {k: v.float() for k, v in reference.items()}
    out = {"data": "omniglot" if spec.get("omniglot") and OMNIGLOT.is_dir() else "random"}
    for precision in ("ieee", "bf16"):
        grads, metrics = learner(torch.float32, precision=precision).meta_gradient(theta, tasks)
        out[f"meta_gradient_{precision}_vs_float64"] = relative(grads, reference)
        out[f"cg_residual_{precision}"] = metrics["cg_residual"].mean().item()
    g = torch.Generator().manual_seed(1)
    nudged = {k: v * (1 + 1e-6 * torch.randn(v.shape, generator=g)) for k, v in theta.items()}
    grads, _ = learner(torch.float32).meta_gradient(theta, tasks)
    out["meta_gradient_fp32_theta_nudged_1e-6"] = relative(learner(torch.float32).meta_gradient(nudged, tasks)[0],
                                                           grads)
    # One gradient and one Hessian-vector product at fixed parameters: the per-operation error.
    model64, model32 = exact.model, learner(torch.float32).model
    fused64, fused32 = model64.fused, model32.fused
    phi64 = {k: v.expand(case["tasks"], *v.shape) for k, v in fused64.to_internal(theta64).items()}
    batch64 = fused64.prepare(tasks64.support_x, tasks64.support_y)
    _, grad64 = fused64.outputs_and_gradient(phi64, batch64)
    vector64 = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in phi64.items()}
    hvp64 = fused64.outputs_and_hessian(phi64, batch64)[1](vector64)
    phi32 = {k: v.float() for k, v in phi64.items()}
    vector32 = {k: v.float() for k, v in vector64.items()}
    batch32 = fused32.prepare(tasks.support_x, tasks.support_y)
    for precision in ("ieee", "bf16"):
        with matmul_precision(precision, torch.device("cpu")):
            _, grad32 = fused32.outputs_and_gradient(phi32, batch32)
            hvp32 = fused32.outputs_and_hessian(phi32, batch32)[1](vector32)
        out[f"one_gradient_{precision}_vs_float64"] = relative(grad32, {k: v.float() for k, v in grad64.items()})
        out[f"one_hvp_{precision}_vs_float64"] = relative(hvp32, {k: v.float() for k, v in hvp64.items()})
    return out


def run_sampling(spec: dict) -> dict:
    import torch

    from imaml_cli.data import ClassificationEpisodes

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    source_name = "generated"
    started = time.perf_counter()
    if OMNIGLOT.is_dir() and not spec.get("generated"):
        from imaml_cli.data import make_episode_source

        source = make_episode_source("omniglot", "train", root=OMNIGLOT, ways=5, shots=1, queries=1,
                                     device=spec["device"])
        source_name = f"omniglot at {OMNIGLOT}"
    else:
        images = torch.randint(0, 256, (4112, 20, 1, 28, 28), dtype=torch.uint8)
        source = ClassificationEpisodes(images, 5, 1, 1, device=spec["device"])
    load_s = time.perf_counter() - started
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        source.sample(32, g)
    times = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        batch = source.sample(32, g)
        if batch.support_x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"source": source_name, "load_s": load_s, "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times), "reps": len(times), "classes": source.num_classes}


def run_compile(spec: dict) -> dict:
    """torch.compile of the fused gradient and Hessian-vector product (a lever measured, not kept)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    case = spec["case"]
    learner = make_learner(case, "imaml-gd", {}, "cpu")
    tasks = make_tasks(case, "cpu")
    fused = learner.model.fused
    phi = {k: v.expand(case["tasks"], *v.shape).clone() for k, v in fused.to_internal(learner.model.parameters()).items()}
    batch = fused.prepare(tasks.support_x, tasks.support_y)
    vector = {k: torch.randn_like(v) for k, v in phi.items()}
    hessian = fused.outputs_and_hessian(phi, batch)[1]
    out = {}
    for name, eager in (("gradient", lambda: fused.outputs_and_gradient(phi, batch)), ("hvp", lambda: hessian(vector))):
        compiled = torch.compile(eager)
        t0 = time.perf_counter()
        compiled()
        out[f"{name}_compile_s"] = time.perf_counter() - t0
        for label, fn in (("eager", eager), ("compiled", compiled)):
            fn()
            times = []
            for _ in range(spec["reps"]):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[f"{name}_{label}_ms"] = 1e3 * statistics.median(times)
    return out


# Steps (Hessian-vector products per task) at which CG and the Neumann series are compared.
SOLVER_STEPS = (5, 10, 20, 40)
SOLVER_QUICK_STEPS = (5, 10)


def run_solver_accuracy(spec: dict) -> dict:
    """Meta-gradient error of CG and of the Neumann series against a dense solve of (I + H/λ) g = ∇L_test.

    float64 throughout, so the error is the solver's alone. The Hessians must fit densely: the
    sinusoid MLP (1,761 parameters) and, for Omniglot, the conv net at 8 channels instead of 64.
    """
    import torch
    from torch.func import grad, hessian, vmap

    from imaml_cli.meta.algorithms import MetaLearner
    from imaml_cli.meta.inner import GradientDescent
    from imaml_cli.meta.task import TaskModel
    from imaml_cli.models import ConvNet

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    case = spec["case"]
    torch.manual_seed(0)
    tasks = make_tasks(case, "cpu", torch.float64)
    if case["model"] == "sinusoid_mlp":
        learner = make_learner(case, "imaml-gd", {}, "cpu", torch.float64)
        model = learner.model
    else:
        model = TaskModel(ConvNet(1, 28, 8, case["ways"], stride=2).double(), "classification")
        if OMNIGLOT.is_dir():
            from imaml_cli.data import TaskBatch, make_episode_source

            source = make_episode_source("omniglot", "train", root=OMNIGLOT, ways=case["ways"],
                                         shots=case["shots"], queries=case["queries"], device="cpu")
            tasks = TaskBatch(*(x.double() if x.is_floating_point() else x
                                for x in source.sample(case["tasks"], torch.Generator().manual_seed(0))))
    theta = model.parameters()
    names, shapes = list(theta), [v.shape for v in theta.values()]
    sizes = [v.numel() for v in theta.values()]

    def unflatten(flat):
        return {n: part.view(shape) for n, part, shape in zip(names, flat.split(sizes, -1), shapes)}

    def flatten(params):
        # Leading (task) dimensions are kept; each parameter's own are flattened.
        return torch.cat([params[n].reshape(*params[n].shape[:params[n].dim() - len(s)], -1)
                          for n, s in zip(names, shapes)], -1)

    inner = GradientDescent(case["steps"], case["lr"], True)
    common = dict(lam=case["lam"], fused=True)
    phi, _ = MetaLearner(model, "imaml", inner, **common).adapt(theta, tasks)
    flat_phi = flatten(phi)
    hessians = vmap(lambda p, x, y: hessian(lambda f: model.loss(unflatten(f), x, y))(p))(
        flat_phi, tasks.support_x, tasks.support_y)
    query_grads = flatten(vmap(grad(model.loss))(phi, tasks.query_x, tasks.query_y))
    eye = torch.eye(flat_phi.shape[-1], dtype=torch.float64)
    systems = eye + hessians / case["lam"]
    spectrum = torch.linalg.eigvalsh(systems)
    lowest, highest = spectrum[:, 0].min().item(), spectrum[:, -1].max().item()
    out = {"parameters": flat_phi.shape[-1], "tasks": case["tasks"], "lam": case["lam"],
           "data": "omniglot" if case["model"] != "sinusoid_mlp" and OMNIGLOT.is_dir() else "generated",
           "regimes": []}
    # After a few inner steps on a ReLU net, I + H/λ is often indefinite: there the "exact" answer
    # is not what either solver approximates. A damping δ (cg.damping) that makes it positive
    # definite, with the smallest eigenvalue 0.5, compares them where the theory holds.
    for damping in (0.0, max(0.0, 0.5 - lowest)) if lowest < 0.5 else (0.0,):
        damped = systems + damping * eye
        exact = torch.linalg.solve(damped, query_grads.unsqueeze(-1)).squeeze(-1).mean(0)
        low, high = lowest + damping, highest + damping
        # Neumann step sizes: half and 0.9 of the convergence bound 2 / λ_max over all tasks, and
        # Richardson's optimum 2 / (λ_min + λ_max), which needs a positive definite matrix.
        step_sizes = {"0.5 * 2/eig_max": 1.0 / high, "0.9 * 2/eig_max": 1.8 / high}
        if low > 0:
            step_sizes["2/(eig_min+eig_max)"] = 2.0 / (low + high)
        solvers = [("cg", None, {})]
        solvers += [("neumann", rule, {"neumann_step_size": alpha}) for rule, alpha in step_sizes.items()]
        regime = {"damping": damping, "eig_min": low, "eig_max": high, "rows": []}
        for steps in spec["steps"]:
            for solver, rule, options in solvers:
                learner = MetaLearner(model, "imaml", inner, cg_steps=steps, cg_solver=solver, cg_damping=damping,
                                      **options, **common)
                grads, metrics = learner.meta_gradient(theta, tasks)
                regime["rows"].append({"solver": solver, "steps": steps, "step_size": options.get("neumann_step_size"),
                                       "step_size_rule": rule,
                                       "relative_error": ((flatten(grads) - exact).norm() / exact.norm()).item(),
                                       "residual": metrics["cg_residual"].mean().item()})
        out["regimes"].append(regime)
    return out


# ----------------------------------------------------------------------------------- parent side

def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        info["amx"] = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        info["cpu"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load() -> list[float]:
    return list(os.getloadavg())


def spawn(kind: str, spec: dict) -> dict:
    """Run one worker in a fresh Python process and return its JSON result (or the error)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1], "returncode": proc.returncode}


def peak(result: dict, cuda: bool) -> float | None:
    key = "peak_cuda_bytes" if cuda else "peak_rss_bytes"
    return result[key] / GIB if key in result else None


def fmt_row(cells, widths):
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))


def print_table(title, header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    print(fmt_row(header, widths))
    print(fmt_row(["-" * w for w in widths], widths))
    for r in rows:
        print(fmt_row(r, widths))


TIMING_COLUMNS = ["s/meta-step", "tasks/s", "peak GiB", "GFLOP", "GFLOP/s", "of fp32 peak", "notes"]


def timing_row(name, result, cuda):
    if "error" in result:
        return [name, "error", "", "", "", "", "", result["error"][:60]]
    if "skipped" in result:
        return [name, "skipped", "", "", "", "", "", result["skipped"]]
    mem = peak(result, cuda)
    notes = f"{len(result['times_s'])} reps, min {result['min_s']:.3f}"
    if not cuda:
        notes += f", cpu {result['cpu_utilization']:.2f}"
    fraction = result.get("fraction_of_fp32_peak")
    return [name, f"{result['median_s']:.3f}", f"{result['tasks_per_s']:.1f}", f"{mem:.2f}" if mem else "",
            f"{result['flops'] / 1e9:.1f}", f"{result['gflops_per_s']:.0f}",
            f"{100 * fraction:.0f}%" if fraction is not None else "", notes]


def against_peak(result: dict, throughput: dict) -> dict:
    """The case's achieved GFLOP/s, that as a fraction of the float32 throughput, and its floor (its
    FLOPs at that throughput)."""
    if "median_s" not in result:
        return result
    result["gflops_per_s"] = result["flops"] / result["median_s"] / 1e9
    if "float32_gflops" in throughput:
        result["fraction_of_fp32_peak"] = result["gflops_per_s"] / throughput["float32_gflops"]
        result["fp32_floor_s"] = result["flops"] / throughput["float32_gflops"] / 1e9
    return result


def authors_script(path: Path) -> Path:
    """``time_authors.sh`` for a folder that holds it and ``imaml_dev/``, or for ``imaml_dev`` itself."""
    for folder in (path, path.parent):
        if (folder / "time_authors.sh").is_file() and (folder / "imaml_dev").is_dir():
            return folder / "time_authors.sh"
    sys.exit(f"error: no time_authors.sh beside imaml_dev/ in {path} or its parent; "
             f"pass --authors the folder that holds both (../shared/peers)")


def against_authors(args, results: dict, timed) -> None:
    """Section 0: the authors' Omniglot example and ours in its shapes, in this run. Theirs is timed
    at two run lengths and differenced (start-up, data loading and task generation cancel)."""
    script = authors_script(args.authors.resolve())
    first, last = AUTHORS_QUICK_STEPS if args.quick else AUTHORS_STEPS
    env = dict(os.environ, PYTHON=sys.executable)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    seconds = {}
    for steps in (first, last):
        proc = subprocess.run(["bash", str(script), str(steps)], capture_output=True, text=True, env=env, cwd=REPO)
        try:
            if proc.returncode != 0:
                raise ValueError(proc.stderr.strip()[-300:])
            seconds[steps] = float(proc.stdout.split()[-1])
        except (ValueError, IndexError) as error:
            results["authors"] = {"error": str(error) or "no output"}
            print(f"\nThe authors' code failed at {steps} meta-steps: {results['authors']['error']}")
            return
    per_step = (seconds[last] - seconds[first]) / (last - first)
    authors = {"script": str(script), "seconds": seconds, "per_step_s": per_step}
    results["authors"] = authors
    rows = [["authors' code (their example command)", f"{per_step:.3f}", "1.0x",
             f"{seconds[first]:.1f} s at {first} steps, {seconds[last]:.1f} s at {last}"]]
    for method in ("imaml-gd", "imaml-hf"):
        r = timed("omniglot_5w1s", method)
        authors[method] = r
        if "median_s" not in r:
            rows.append([method, "error", "", r.get("error", "")[:60]])
            continue
        authors[f"{method}_speedup"] = per_step / r["median_s"]
        notes = f"{r['flops'] / 1e9:.1f} GFLOP"
        if "fraction_of_fp32_peak" in r:
            notes += f", {100 * r['fraction_of_fp32_peak']:.0f}% of fp32 peak, floor {r['fp32_floor_s']:.3f} s"
        rows.append([f"ours, {method}", f"{r['median_s']:.3f}", f"{per_step / r['median_s']:.1f}x", notes])
    if "imaml-hf" in authors and "median_s" in authors["imaml-hf"] and "median_s" in authors["imaml-gd"]:
        authors["hf_over_gd"] = authors["imaml-hf"]["median_s"] / authors["imaml-gd"]["median_s"]
    print_table("Against the authors' code: Omniglot 5-way 1-shot in their shapes (32 tasks, 1 query/class, "
                "16 inner steps, λ = 2, 5 CG steps), same machine, same run"
                + (" (--quick: ours on 4 tasks, so the speed-up means nothing)" if args.quick else ""),
                ["code", "s/meta-step", "speed-up", "notes"], rows)
    if "hf_over_gd" in authors:
        print(f"iMAML-HF ({CASES['omniglot_5w1s']['hf_steps']} Newton iterations) / iMAML-GD per meta-step: "
              f"{authors['hf_over_gd']:.2f}")


def capped(spec: dict, cap_gib: float, cuda: bool, probe: dict) -> dict:
    """Run second-order MAML unless its memory, extrapolated linearly in the inner steps from two
    short probes (kept in ``probe``), would pass the cap."""
    case = spec["case"]
    key = (json.dumps({k: v for k, v in case.items() if k != "steps"}, sort_keys=True), spec["method"])
    if key not in probe:
        points = []
        for steps in (2, 4):
            r = spawn("time", dict(spec, case=dict(case, steps=steps), warmup=0, reps=1))
            if "error" in r:
                return r
            points.append((steps, peak(r, cuda)))
        probe[key] = points
    (s1, m1), (s2, m2) = probe[key]
    predicted = m2 + (m2 - m1) / (s2 - s1) * (case["steps"] - s2)
    if predicted > cap_gib:
        return {"skipped": f"predicted {predicted:.1f} GiB > cap {cap_gib:g} GiB", "predicted_gib": predicted}
    return spawn("time", spec)


def plot_scaling(scaling: dict, path: Path, cuda: bool, cap: float) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; no plot (pip install imaml[plot]). Data: {path.with_suffix('.json')}")
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for method, style in (("imaml-gd", "o-"), ("maml", "s--")):
        points = [(s, r) for s, r in scaling[method] if "median_s" in r]
        if not points:
            continue
        steps = [s for s, _ in points]
        ax_t.plot(steps, [r["median_s"] for _, r in points], style, label=method)
        ax_m.plot(steps, [peak(r, cuda) for _, r in points], style, label=method)
    for ax, label in ((ax_t, "seconds per meta-step"), (ax_m, ("peak allocated" if cuda else "peak RSS") + " (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("inner steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_m.axhline(cap, color="gray", lw=0.8, ls=":", label=f"cap {cap:g} GiB")
    ax_m.legend(fontsize=8)
    fig.suptitle("Omniglot 5-way 1-shot, meta-batch 32: compute and memory vs inner steps", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def speed_suite(args, base: dict, results: dict, timed) -> None:
    """Sections 1-6: every algorithm and case, the speed switches, batching, inner-step scaling,
    reduced precision, episode sampling (and torch.compile with ``--compile``)."""
    cuda = args.device == "cuda"
    # 1. Every algorithm on every case.
    case_names = ["omniglot_5w1s", "sinusoid"] if args.quick else list(CASES)
    methods = ("imaml-gd", "fomaml") if args.quick else METHODS
    results["cases"] = {}
    for case_name in case_names:
        rows = []
        results["cases"][case_name] = {"shape": CASES[case_name]}
        for method in methods:
            r = timed(case_name, method)
            results["cases"][case_name][method] = r
            rows.append(timing_row(method, r, cuda))
        c = dict(CASES[case_name], tasks=min(CASES[case_name]["tasks"], 4) if args.quick else CASES[case_name]["tasks"])
        print_table(f"{case_name}: meta-batch {c['tasks']}, {c['ways']}-way {c['shots']}-shot, {c['queries']} "
                    f"queries/class, {c['steps']} inner steps (HF: {c['hf_steps']} Newton steps)",
                    ["method", *TIMING_COLUMNS], rows)

    # 2. The speed switches, on the authors' 5-way 1-shot shapes with iMAML-GD.
    if not cuda and not args.quick:
        rows, results["levers"] = [], {}
        for name, options in LEVERS:
            r = timed("omniglot_5w1s", "imaml-gd", options)
            results["levers"][name] = dict(r, options=options)
            rows.append(timing_row(name, r, cuda))
        for name, options in (("iMAML-HF, fused passes (default)", {}),
                              ("iMAML-HF, vmap over autograd (fused=False)", {"fused": False})):
            r = timed("omniglot_5w1s", "imaml-hf", options)
            results["levers"][name] = dict(r, options=options)
            rows.append(timing_row(name, r, cuda))
        print_table("Speed switches, omniglot_5w1s, iMAML-GD (each line adds to the one above; the last two: "
                    "iMAML-HF)",
                    ["configuration", *TIMING_COLUMNS], rows)

    # 3. Batched against the per-task loop that the tests use as reference, same inputs.
    rows, results["batched_vs_loop"] = [], {}
    for name, options in (("batched (vmap + fused, default)", {}), ("per-task loop (vectorize=False)",
                                                                    {"vectorize": False})):
        r = timed("omniglot_5w1s", "imaml-gd", options)
        results["batched_vs_loop"][name] = r
        rows.append(timing_row(name, r, cuda))
    print_table("Batched vs per-task loop, omniglot_5w1s, iMAML-GD",
                ["path", *TIMING_COLUMNS], rows)

    # 4. Inner-step scaling: the paper's compute-and-memory figure, on our code.
    steps_list = (5, 10) if args.quick else SCALING_STEPS
    results["scaling"] = {m: [] for m in ("imaml-gd", "maml")}
    rows = []
    for steps in steps_list:
        row = [steps]
        for method in ("imaml-gd", "maml"):
            r = timed("omniglot_5w1s", method, steps=steps)
            results["scaling"][method].append((steps, r))
            mem = peak(r, cuda)
            row += [f"{r['median_s']:.3f}" if "median_s" in r else r.get("skipped", r.get("error", ""))[:40],
                    f"{mem:.2f}" if mem else ""]
        rows.append(row)
    imaml_mem = [peak(r, cuda) for _, r in results["scaling"]["imaml-gd"] if "median_s" in r]
    if len(imaml_mem) >= 2:
        results["imaml_memory_ratio_last_to_first"] = imaml_mem[-1] / imaml_mem[0]
    print_table(f"Inner-step scaling, omniglot_5w1s shapes (meta-batch {4 if args.quick else 32})",
                ["steps", "iMAML s", "iMAML GiB", "MAML s", "MAML GiB"], rows)
    if "imaml_memory_ratio_last_to_first" in results:
        print(f"iMAML peak memory at {steps_list[-1]} steps / at {steps_list[0]} steps: "
              f"{results['imaml_memory_ratio_last_to_first']:.3f}")

    # 5. Accuracy of reduced precision (CPU only: bf16 products).
    if not cuda and not args.quick:
        r = spawn("accuracy", dict(base, case=CASES["omniglot_5w1s"], omniglot=True))
        results["accuracy"] = r
        print_table("Meta-gradient error, omniglot_5w1s, iMAML-GD (relative, L2 over all parameters)",
                    ["quantity", "value"], [[k, f"{v:.2e}" if isinstance(v, float) else v] for k, v in r.items()])

    # 6. Episode sampling.
    r = spawn("sampling", dict(base, reps=20 if args.quick else 200, generated=args.quick))
    results["sampling"] = r
    if "error" in r:
        print(f"\nEpisode sampling failed: {r['error']}")
    else:
        print(f"\nEpisode sampling, 32 Omniglot 5-way 1-shot episodes ({r['source']}, {r['classes']} classes): "
              f"median {r['median_ms']:.2f} ms, min {r['min_ms']:.2f} ms over {r['reps']} meta-batches")

    if args.compile and not cuda:
        r = spawn("compile", dict(base, case=CASES["omniglot_5w1s"], reps=10))
        results["compile"] = r
        print_table("torch.compile of the fused passes (omniglot_5w1s)", ["quantity", "value"],
                    [[k, f"{v:.2f}" if isinstance(v, float) else v] for k, v in r.items()])


def compare_solvers(args, base: dict, results: dict, timed) -> None:
    """Section 7: CG against the Neumann series, meta-gradient error (against a dense solve) and time."""
    steps_list = SOLVER_QUICK_STEPS if args.quick else SOLVER_STEPS
    results["solvers"] = {"accuracy": {}, "timing": {}}
    for case_name in ("sinusoid", "omniglot_5w1s"):
        # At most 8 tasks: the dense Hessians of a whole meta-batch would take gigabytes.
        case = dict(CASES[case_name], tasks=min(CASES[case_name]["tasks"], 4 if args.quick else 8))
        r = spawn("solvers", dict(base, case=case, steps=steps_list))
        results["solvers"]["accuracy"][case_name] = r
        if "error" in r:
            print(f"\nSolver accuracy on {case_name} failed: {r['error']}")
            continue
        for regime in r["regimes"]:
            rows = [[row["solver"], row["steps"], row["step_size_rule"] or "",
                     f"{row['step_size']:.3g}" if row["step_size"] else "",
                     f"{row['relative_error']:.2e}", f"{row['residual']:.2e}"] for row in regime["rows"]]
            print_table(f"Meta-gradient error against a dense solve, {case_name} ({r['data']} data, "
                        f"{r['parameters']} parameters, {r['tasks']} tasks, λ = {r['lam']}, damping δ = "
                        f"{regime['damping']:.3g}: eigenvalues of I + H/λ + δI in [{regime['eig_min']:.3g}, "
                        f"{regime['eig_max']:.3g}]; float64)",
                        ["solver", "steps", "Neumann step size", "α", "relative error", "mean residual"], rows)
    rows = []
    for case_name in ("sinusoid", "omniglot_5w1s"):
        for steps in (steps_list[0], steps_list[-1]):
            for solver in ("cg", "neumann"):
                r = timed(case_name, "imaml-gd", {"cg_solver": solver, "cg_steps": steps})
                results["solvers"]["timing"][f"{case_name}/{solver}/{steps}"] = r
                rows.append(timing_row(f"{case_name}, {solver}, {steps} steps", r, args.device == "cuda"))
    print_table("Seconds per iMAML-GD meta-step by implicit solver (default settings otherwise)",
                ["case, solver, steps", *TIMING_COLUMNS], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a small subset, for a smoke test")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    parser.add_argument("--reps", type=int, default=5, help="timed meta-steps per case (after 1 warm-up)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed steps per case, at most")
    parser.add_argument("--memory-cap", type=float, default=10.0, help="GiB; MAML runs predicted above it are skipped")
    parser.add_argument("--json", type=Path, help="default: docs/benchmark_results.json, with --solvers "
                        "docs/benchmark_solvers.json (--quick: a temp dir)")
    parser.add_argument("--plot", type=Path, help="default: docs/inner_step_scaling.png (--quick: a temp dir)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the fused passes (slow)")
    parser.add_argument("--solvers", action="store_true", help="only section 7, CG against the Neumann series")
    parser.add_argument("--authors", type=Path, help="also time the authors' code: the folder with imaml_dev/ and "
                        "time_authors.sh (../shared/peers)")
    parser.add_argument("--only-authors", action="store_true", help="with --authors: only that comparison")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, spec = args.worker
        runner = {"time": run_worker, "accuracy": run_accuracy, "sampling": run_sampling, "compile": run_compile,
                  "solvers": run_solver_accuracy, "throughput": run_throughput}[kind]
        print("RESULT " + json.dumps(runner(json.loads(spec))))
        return

    out_dir = Path(tempfile.gettempdir()) / "imaml_benchmark_quick" if args.quick else REPO / "docs"
    args.json = args.json or out_dir / ("benchmark_solvers.json" if args.solvers else
                                        "benchmark_authors.json" if args.only_authors else "benchmark_results.json")
    args.plot = args.plot or out_dir / "inner_step_scaling.png"
    cuda = args.device == "cuda"
    base = dict(device=args.device, threads=args.threads or None, warmup=1, reps=2 if args.quick else args.reps,
                budget_s=3.0 if args.quick else args.budget)
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(args.device),
               "load_before": load(), "memory_cap_gib": args.memory_cap}
    if args.only_authors and not args.authors:
        parser.error("--only-authors needs --authors DIR")
    started = time.perf_counter()
    probe: dict = {}
    throughput = results["throughput"] = spawn("throughput", dict(base, reps=10))
    if "error" in throughput:
        print(f"Matrix-product throughput failed: {throughput['error']}")
    else:
        print("Matrix-product throughput (best of 10 square products of size "
              f"{throughput['size']}): " + ", ".join(f"{k.removesuffix('_gflops')} {v:.0f} GFLOP/s"
                                                      for k, v in throughput.items() if k.endswith("_gflops")))

    def timed(case_name, method, options=None, steps=None):
        case = dict(CASES[case_name])
        if steps is not None:
            case["steps"] = steps
        if args.quick:
            case["tasks"] = min(case["tasks"], 4)
        spec = dict(base, case=case, method=method, options=options or {})
        if method == "maml" and not args.quick:
            return against_peak(capped(spec, args.memory_cap, cuda, probe), throughput)
        return against_peak(spawn("time", spec), throughput)

    if args.quick:
        print("--quick: meta-batches of at most 4 tasks, 2 timed steps; numbers are for smoke-testing only")
    if args.authors:
        against_authors(args, results, timed)
    if not args.solvers and not args.only_authors:
        speed_suite(args, base, results, timed)
    if not args.only_authors:
        compare_solvers(args, base, results, timed)

    results["load_after"] = load()
    results["wall_s"] = time.perf_counter() - started
    m = results["machine"]
    print(f"\n{m.get('gpu') or m.get('cpu')}, {m['threads']} torch threads, torch {m['torch']}; load average "
          f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after; {results['wall_s']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")
    if "scaling" in results and plot_scaling(results["scaling"], args.plot, cuda, args.memory_cap):
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
