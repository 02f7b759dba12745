#!/usr/bin/env python
"""Paired multi-seed runs of the quick configs, their statistics and their results page.

    python tools/seed_study.py --configs plain mdconv dcnv2 --seeds 0 1 2 3 4   # run or resume
    python tools/seed_study.py --render            # the page block and the plot, from the JSON
    python tools/seed_study.py --rerun mdconv 3    # rerun one listed run, print the AP difference
    python tools/seed_study.py --eval-noise plain 0 --subset 100   # box AP on disjoint val subsets
    python tools/seed_study.py --eval-test         # the test-split AP of recorded runs lacking it

Pairing: seed ``s`` gives every config the same start. The plain twin is built with ``SEED s``
and its initial weights are saved (``<workdir>/init/seed<s>.pth``); every config, the plain twin
included, trains from that file (``MODEL.WEIGHTS``) with ``SEED s``. Parameters only a DCNv2
config has (offset / mask predictors, mdpool's offset fcs) keep their own initialisation; before
the first run the tool checks that every other parameter matches the file by name and shape
(:func:`match_init_keys`) and that the training loader yields the same first batches, flips
included, for every config (:func:`data_fingerprint`). What stays unpaired: RPN and RoI-head
sampling draws from torch's generator, whose state after building differs between models.

Each run is a ``train_net.py`` subprocess whose log, metrics and checkpoint stay in
``<workdir>/<config>/seed<s>``; its final checkpoint is then evaluated on the 2000-image test
split (``--eval-only``), whose AP depends far less on the images drawn than the validation
split's, so that the spread between seeds there is the training's own. Reruns (``--rerun``, and
``--eval-test`` when a checkpoint is gone) are kept in the JSON with their AP difference.

The JSON (``--json``) is rewritten after every run: a finished (config, seed) is never rerun,
so an interrupted study resumes by running the same command. Each record holds box / mask AP,
the test split's, s/iter, wall time, the loss curve and the build (git commit,
``git rev-parse HEAD:csrc``, CPU model and SIMD flags, torch, threads).
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK = "configs/quick_schedules"
CONFIGS = {  # short name -> config file; the first is the reference of the paired differences
    "plain": "mask_rcnn_R50_FPN_shapes.yaml",
    "mdconv": "mask_rcnn_R50_FPN_mdconv_shapes.yaml",
    "dcnv2": "mask_rcnn_R50_FPN_dcnv2_shapes.yaml",
    "mdpool": "faster_rcnn_R50_FPN_mdpool_shapes.yaml",
    "mimic": "mask_rcnn_R50_FPN_dcnv2_mimic_shapes.yaml",
}
LABELS = {
    "plain": "plain (no DCN)",
    "mdconv": "mdconv c3-c5",
    "dcnv2": "mdconv + mdpool",
    "mdpool": "mdpool (Faster R-CNN)",
    "mimic": "mdconv + mdpool + mimic",
}
TEST_SPLIT = "dcnv2_shapes_test"  # 2000 images: the AP a trained model gets, nearly free of
# the evaluation noise of the 500 validation images (projects_dcnv2/data/shapes.py)
PAGE = "docs/results/quick_configs.md"
PLOT = "docs/images/seed_study_shapes.png"
BEGIN, END = "<!-- seed-study -->", "<!-- /seed-study -->"


# ---- statistics -------------------------------------------------------------------------------


def mean_std(values):
    """(mean, sample standard deviation with n - 1); the std is None below two values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std: expected at least one value, got none")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _t_cdf_from_zero(x, df):
    """P(0 < T < x) for Student's t with ``df`` degrees of freedom (Simpson's rule on the pdf)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    steps = 2000  # even; the pdf is smooth, so this is exact to ~1e-10 for x < 100
    h = x / steps
    total = 0.0
    for i in range(steps + 1):
        weight = 1 if i in (0, steps) else (4 if i % 2 else 2)
        t = i * h
        total += weight * math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))
    return total * h / 3


def t_quantile(p, df):
    """The ``p`` quantile (p in (0.5, 1)) of Student's t with ``df`` >= 1 degrees of freedom."""
    if not 0.5 < p < 1:
        raise ValueError(f"t_quantile: expected 0.5 < p < 1, got p={p}")
    if df < 1:
        raise ValueError(f"t_quantile: expected df >= 1, got df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf_from_zero(hi, df) < p - 0.5:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf_from_zero(mid, df) < p - 0.5 else (lo, mid)
    return (lo + hi) / 2


def paired_difference(reference, other, level=0.95):
    """``other - reference`` over the seeds both dicts (seed -> AP) hold.

    Returns:
        dict: n, mean, sd (of the differences), half (the half-width of the ``level``
        Student-t interval), lo, hi; sd, half, lo and hi are None for n < 2.
    """
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        raise ValueError("paired_difference: the two configs share no seed")
    diffs = [other[s] - reference[s] for s in seeds]
    mean, sd = mean_std(diffs)
    if sd is None:
        return {"n": 1, "mean": mean, "sd": None, "half": None, "lo": None, "hi": None}
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return {
        "n": len(diffs), "mean": mean, "sd": sd, "half": half, "lo": mean - half, "hi": mean + half
    }  # fmt: skip


def seeds_for_half_width(sd, half=1.0, level=0.95):
    """The fewest paired seeds whose ``level`` Student-t interval has a half-width of at most
    ``half``, for paired differences of standard deviation ``sd``."""
    if sd <= 0:
        return 2
    # t > z: no n below the normal approximation's (z = 1.95996 for 95%) can do.
    n = max(2, math.ceil((1.959963 * sd / half) ** 2)) if level == 0.95 else 2
    while t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) > half:
        n += 1
    return n


# ---- pairing checks ---------------------------------------------------------------------------


def match_init_keys(init_shapes, model_shapes):
    """Checks that a model takes every parameter of the saved initial state it has a place for.

    Args:
        init_shapes, model_shapes (dict[str, tuple]): state-dict key -> tensor shape.
    Returns:
        dict: shared (keys loaded from the file), new (the model's own keys, e.g. offset convs),
        unused (file keys under a module the model does not have, e.g. a Faster R-CNN's mask head).
    Raises:
        ValueError: a shared key differs in shape, or a file key is missing from a module that the
            model has (a rename would silently leave that parameter at its own initialisation).
    """
    shared = sorted(set(init_shapes) & set(model_shapes))
    bad = [k for k in shared if tuple(init_shapes[k]) != tuple(model_shapes[k])]
    if bad:
        k = bad[0]
        raise ValueError(
            f"initial state: {len(bad)} shared keys differ in shape, e.g. {k}: "
            f"file {tuple(init_shapes[k])} vs model {tuple(model_shapes[k])}"
        )
    prefixes = {k[: i + 1] for k in model_shapes for i, ch in enumerate(k) if ch == "."}
    unused = sorted(set(init_shapes) - set(model_shapes))
    renamed = [k for k in unused if k.rsplit(".", 1)[0] + "." in prefixes]
    if renamed:
        raise ValueError(
            f"initial state: {len(renamed)} keys of modules the model has are missing from it, "
            f"e.g. {renamed[0]} (renamed?)"
        )
    if not shared:
        raise ValueError("initial state: no key is shared with the model")
    new = sorted(set(model_shapes) - set(init_shapes))
    return {"shared": len(shared), "new": len(new), "unused": len(unused)}


def _setup_cfg(config, seed, opts=()):
    from projects_dcnv2 import load_dcnv2_config

    return load_dcnv2_config(str(REPO / QUICK / CONFIGS[config]), ["SEED", str(seed), *opts])


def initial_state(seed, path, opts=()):
    """Builds the plain twin as train_net.py does for ``SEED seed`` and saves its state_dict."""
    import torch

    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(seed)
    model = build_model(_setup_cfg("plain", seed, opts))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def model_shapes(config, seed, opts=()):
    import torch

    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    model = build_model(_setup_cfg(config, seed, opts))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def data_fingerprint(config, seed, batches=3, opts=()):
    """SHA-1 of the first ``batches`` training batches (file names and image tensors, so flips
    count) that train_net.py's loader yields for ``config`` and ``seed``: seeded as
    ``default_setup`` seeds, after the model is built, as ``DCNv2Trainer`` builds it."""
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    from projects_dcnv2.engine import DCNv2Trainer

    cfg = _setup_cfg(config, seed, opts)
    seed_all_rng(seed)
    build_model(cfg)
    digest = hashlib.sha1()
    for _, batch in zip(range(batches), DCNv2Trainer.build_train_loader(cfg)):
        for item in batch:
            digest.update(item["file_name"].encode())
            digest.update(item["image"].numpy().tobytes())
    return digest.hexdigest()


# ---- running ----------------------------------------------------------------------------------


def build_info(repo=REPO):
    """Git commit, csrc tree hash (+ whether csrc has uncommitted changes), CPU and torch."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()

    import torch

    cpu, flags = platform.processor(), []
    if os.path.exists("/proc/cpuinfo"):
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
        all_flags = re.search(r"flags\s*:\s*(.*)", text).group(1).split()
        flags = sorted(f for f in all_flags if f.startswith(("avx", "fma", "sse", "amx")))
    return {
        "commit": git("rev-parse", "HEAD"),
        "csrc": git("rev-parse", "HEAD:csrc"),
        "csrc_dirty": bool(git("status", "--porcelain", "csrc")),
        "cpu": cpu,
        "cpu_flags": flags,
        "torch": torch.__version__,
    }


def parse_aps(log):
    """(box AP, mask AP or None) from the copypaste lines of a train_net.py log."""
    aps = {}
    for task, values in re.findall(
        r"copypaste: Task: (\w+)\n.*copypaste: AP,.*\n.*copypaste: ([-\d.,naN]+)", log
    ):
        aps[task] = float(values.split(",")[0])
    if "bbox" not in aps:
        raise RuntimeError("train_net.py log: no bbox AP found")
    return aps["bbox"], aps.get("segm")


def parse_log(log):
    """(box AP, mask AP or None, s/iter) from a train_net.py training log."""
    box, mask = parse_aps(log)
    speed = re.findall(r"Overall training speed: .*\(([\d.]+) s / it\)", log)
    if not speed:
        raise RuntimeError("train_net.py log: no training speed found")
    return box, mask, float(speed[-1])


def loss_curve(metrics_path):
    """[[iteration, total_loss], ...] as Detectron2's JSONWriter logged them."""
    curve = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if "total_loss" in record:
                curve[record["iteration"]] = round(record["total_loss"], 4)
    return [[i, curve[i]] for i in sorted(curve)]


class TrainNetRunner:
    """Runs one (config, seed) as a train_net.py subprocess; returns its record."""

    def __init__(self, workdir, threads, opts=()):
        self.workdir, self.threads, self.opts = Path(workdir), threads, list(opts)

    def init_path(self, seed):
        return self.workdir / "init" / f"seed{seed}.pth"

    def run_dir(self, config, seed):
        return self.workdir / config / f"seed{seed}"

    def _train_net(self, config, seed, out, args):
        """Runs train_net.py with ``args`` into the fresh folder ``out``; (log text, wall s)."""
        shutil.rmtree(out, ignore_errors=True)  # a run interrupted half-way starts over
        out.mkdir(parents=True)
        cmd = [
            sys.executable, "train_net.py", "--config-file", f"{QUICK}/{CONFIGS[config]}",
            *args, "SEED", str(seed), "OUTPUT_DIR", str(out), *self.opts,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONPATH=str(REPO))
        start = time.time()
        with open(out / "log.txt", "w") as log:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.time() - start
        text = (out / "log.txt").read_text()
        if rc.returncode != 0:
            raise RuntimeError(
                f"{config} seed {seed}: {' '.join(cmd[1:4])} failed:\n{text[-3000:]}"
            )
        return text, wall

    def evaluate(self, config, seed, dataset=TEST_SPLIT):
        """Evaluates the run's final checkpoint on ``dataset`` (``--eval-only``, into
        ``<run>/<dataset>``); returns the record's ``test`` entry."""
        run = self.run_dir(config, seed)
        weights = run / "model_final.pth"
        if not weights.is_file():
            raise FileNotFoundError(f"{config} seed {seed}: no checkpoint {weights}")
        args = ["--eval-only", "MODEL.WEIGHTS", str(weights), "DATASETS.TEST", f"('{dataset}',)"]
        text, wall = self._train_net(config, seed, run / dataset, args)
        box, mask = parse_aps(text)
        return {
            "dataset": dataset,
            "box_ap": round(box, 3),
            "mask_ap": None if mask is None else round(mask, 3),
            "wall_s": round(wall, 1),
        }

    def checkpoint_ap(self, config, seed):
        """Box AP the run folder's own training log reports, or None without a checkpoint."""
        run = self.run_dir(config, seed)
        if not (run / "model_final.pth").is_file() or not (run / "log.txt").is_file():
            return None
        try:
            return parse_aps((run / "log.txt").read_text())[0]
        except RuntimeError:
            return None

    def __call__(self, config, seed):
        out = self.run_dir(config, seed)
        text, wall = self._train_net(
            config, seed, out, ["MODEL.WEIGHTS", str(self.init_path(seed))]
        )
        box, mask, s_iter = parse_log(text)
        return {
            "config": config,
            "seed": seed,
            "box_ap": round(box, 3),
            "mask_ap": None if mask is None else round(mask, 3),
            "s_per_iter": s_iter,
            "wall_s": round(wall, 1),
            "threads": self.threads,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "build": build_info(),
            "loss": loss_curve(out / "metrics.json"),
        }


def load_study(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {"plan": {}, "runs": []}


def save_study(path, study):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(study, indent=1) + "\n")
    os.replace(tmp, path)


def pending(study):
    """The planned (config, seed) pairs not yet recorded, seed by seed (so runs stay paired)."""
    done = {(r["config"], r["seed"]) for r in study["runs"]}
    plan = study["plan"]
    return [(c, s) for s in plan["seeds"] for c in plan["configs"] if (c, s) not in done]


def run_study(path, configs, seeds, runner, prepare=None, evaluate=None):
    """Runs the pending (config, seed) pairs of the study in ``path`` (created if absent), saving
    the JSON after each; the plan grows by ``configs`` and ``seeds``. ``prepare(seed, study)`` is
    called once per seed before its first pending run (the initial state, the checks);
    ``evaluate(config, seed)``, when given, after each run: its result is the record's ``test``."""
    study = load_study(path)
    plan = study["plan"]
    plan["configs"] = plan.get("configs", []) + [
        c for c in configs if c not in plan.get("configs", [])
    ]
    plan["seeds"] = plan.get("seeds", []) + [s for s in seeds if s not in plan.get("seeds", [])]
    save_study(path, study)
    prepared = set()
    for config, seed in pending(study):
        if prepare is not None and seed not in prepared:
            prepare(seed, study)
            save_study(path, study)
            prepared.add(seed)
        print(f"seed_study: {config} seed {seed} ...", flush=True)
        record = runner(config, seed)
        if evaluate is not None:
            record["test"] = evaluate(config, seed)
        study["runs"].append(record)
        save_study(path, study)
        print(f"seed_study: {config} seed {seed}: box AP {record['box_ap']:.1f}", flush=True)
    return study


def _rerun_entry(old, box_ap, build, threads):
    ops = ("csrc", "csrc_dirty", "cpu", "cpu_flags", "torch")
    same = all(build.get(k) == old["build"].get(k) for k in ops) and threads == old["threads"]
    return {
        "config": old["config"],
        "seed": old["seed"],
        "recorded": old["box_ap"],
        "now": round(box_ap, 3),
        "difference": round(box_ap - old["box_ap"], 3),
        "same_ops_build": same,
        "commit": build["commit"],
        "csrc": build["csrc"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fill_test(path, runner, evaluate, tolerance=0.1):
    """Adds the ``test`` entry to every record of the study that lacks it, from the run folder's
    checkpoint: a checkpoint left by an earlier run or rerun is used as it is, otherwise the run is
    trained again. Either way the checkpoint's validation box AP is compared with the record and
    the comparison kept in the JSON's ``reruns``; a checkpoint more than ``tolerance`` AP away is
    not the recorded model, and its record gets no ``test`` entry.

    Returns:
        list: the (config, seed) pairs left without a ``test`` entry.
    """
    study = load_study(path)
    left = []
    order = study["plan"]["configs"]  # config by config: the reference's runs first
    for old in sorted(study["runs"], key=lambda r: (order.index(r["config"]), r["seed"])):
        if "test" in old:
            continue
        config, seed = old["config"], old["seed"]
        box_ap = runner.checkpoint_ap(config, seed)
        if box_ap is None:
            print(f"seed_study: {config} seed {seed}: training it again ...", flush=True)
            new = runner(config, seed)
            box_ap, build, threads = new["box_ap"], new["build"], new["threads"]
        else:
            build, threads = build_info(), runner.threads
        entry = _rerun_entry(old, box_ap, build, threads)
        study.setdefault("reruns", []).append(entry)
        print(f"seed_study: {config} seed {seed}: {json.dumps(entry)}", flush=True)
        if abs(entry["difference"]) <= tolerance:
            old["test"] = evaluate(config, seed)
        else:
            left.append((config, seed))
        save_study(path, study)
    return left


def make_prepare(runner, opts=()):
    """The per-seed preparation: the initial state, then (once per study) the key and data checks."""

    def prepare(seed, study):
        init_shapes = initial_state(seed, runner.init_path(seed), opts)
        checks = study.setdefault("checks", {})
        for config in study["plan"]["configs"]:
            if config not in checks:
                keys = match_init_keys(init_shapes, model_shapes(config, seed, opts))
                checks[config] = {
                    "seed": seed,
                    "keys": keys,
                    "data": data_fingerprint(config, seed),
                }
        fingerprints = {c["seed"]: set() for c in checks.values()}
        for c in checks.values():
            fingerprints[c["seed"]].add(c["data"])
        if any(len(f) > 1 for f in fingerprints.values()):
            raise RuntimeError(f"seed_study: the configs see different training data: {checks}")

    return prepare


def rerun(path, config, seed, runner, tolerance=0.1):
    """Runs a recorded (config, seed) again and prints its box AP difference from the record.

    Returns:
        bool: False when the ops build (csrc tree, CPU, torch) and thread count are the
        recorded ones and the AP moved by more than ``tolerance``.
    """
    old = [r for r in load_study(path)["runs"] if (r["config"], r["seed"]) == (config, seed)]
    if not old:
        raise SystemExit(f"--rerun: {config} seed {seed} is not in {path}")
    old, new = old[0], runner(config, seed)
    entry = _rerun_entry(old, new["box_ap"], new["build"], new["threads"])
    study = load_study(path)
    study.setdefault("reruns", []).append(entry)
    save_study(path, study)
    same, diff = entry["same_ops_build"], new["box_ap"] - old["box_ap"]
    print(
        f"{config} seed {seed}: box AP {new['box_ap']:.3f} now, {old['box_ap']:.3f} recorded: "
        f"difference {diff:+.3f} ({'same' if same else 'another'} ops build, CPU and thread count; "
        f"commit {new['build']['commit'][:7]} now, {old['build']['commit'][:7]} recorded)"
    )
    return not same or abs(diff) <= tolerance


# ---- rendering --------------------------------------------------------------------------------


def _fmt(value, digits=1, sign=False):
    return "–" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


def by_config(study, key="box_ap", split=None):
    """config -> {seed: value}, in plan order; ``split="test"``: the record's test-split value."""
    table = {c: {} for c in study["plan"]["configs"]}
    for r in study["runs"]:
        source = r if split is None else r.get(split, {})
        if source.get(key) is not None:
            table.setdefault(r["config"], {})[r["seed"]] = source[key]
    return table


def finding(reference, config, diff):
    """The plain sentence for one paired difference."""
    if diff["half"] is not None and (diff["lo"] > 0 or diff["hi"] < 0):
        return (
            f"**{config}: {diff['mean']:+.1f} ± {diff['half']:.1f} box AP over {diff['n']} seeds** "
            f"(95% interval of the paired difference to {reference})."
        )
    if diff["half"] is None:
        return f"**{config} vs {reference}: one seed so far, no interval** ({diff['mean']:+.1f} box AP)."
    return (
        f"**{config} vs {reference}: no difference is resolvable at this scale** "
        f"({diff['mean']:+.1f} box AP, 95% interval {diff['lo']:+.1f} to {diff['hi']:+.1f}, "
        f"{diff['n']} seeds; at this spread of the paired differences, std {diff['sd']:.1f}, an "
        f"interval of ±1.0 AP would take {seeds_for_half_width(diff['sd'])} seeds)."
    )


def _ap_tables(study, split, extra_row=None):
    """The per-seed table, mean ± std, paired differences and findings of one split's APs."""
    configs, seeds = study["plan"]["configs"], study["plan"]["seeds"]
    box, mask = by_config(study, split=split), by_config(study, "mask_ap", split)
    lines = ["| seed | " + " | ".join(f"{LABELS[c]}" for c in configs) + " |"]
    lines.append("|---" * (len(configs) + 1) + "|")
    for s in seeds:
        cells = [
            f"{_fmt(box[c].get(s))} ({_fmt(mask[c].get(s))})" if s in box[c] else "–"
            for c in configs
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    stats = []
    for c in configs:
        if box[c]:
            mean, std = mean_std(list(box[c].values()))
            stats.append(f"**{_fmt(mean)} ± {_fmt(std)}**")
        else:
            stats.append("–")
    lines.append("| mean ± std | " + " | ".join(stats) + " |")
    if extra_row:
        lines.append(extra_row)
    reference = configs[0]
    pairs = [
        (a, b) for i, a in enumerate(configs) for b in configs[i + 1 :] if set(box[a]) & set(box[b])
    ]
    if pairs:
        names = ", ".join(f"{c} = {LABELS[c]}" for c in configs)
        lines += [
            "",
            f"Paired differences of box AP (second minus first, same seeds; {names}):",
            "",
        ]
        lines.append("| pair | seeds | mean difference | 95% interval |")
        lines.append("|---|---|---|---|")
        for a, b in pairs:
            d = paired_difference(box[a], box[b])
            interval = "–" if d["half"] is None else f"{d['lo']:+.1f} to {d['hi']:+.1f}"
            lines.append(f"| {b} − {a} | {d['n']} | {d['mean']:+.1f} | {interval} |")
        lines += ["", "Finding:", ""]
        for b in configs[1:]:
            if set(box[reference]) & set(box[b]):
                diff = paired_difference(box[reference], box[b])
                lines.append(f"- {finding(reference, b, diff)}")
    return lines


def _noise_line(noise, split_name):
    mean, std = mean_std(noise["aps"])
    slices = len(noise["aps"])
    return (
        f"Evaluation noise alone: the {noise['config']} seed {noise['seed']} model scored "
        f"{', '.join(_fmt(a) for a in noise['aps'])} box AP on {slices} disjoint "
        f"{noise['subset']}-image subsets of the {split_name} (std {_fmt(std)}; "
        f"{_fmt(noise['full'])} on all {noise['images']} images), so the AP on all "
        f"{noise['images']} images moves by about {_fmt(std / math.sqrt(slices))} "
        f"(std / √{slices}) with the images drawn."
    )


def render_markdown(study, plot_path=PLOT):
    """The page block (between the markers) for ``study``."""
    configs = study["plan"]["configs"]
    seeds = study["plan"]["seeds"]
    done, planned = len(study["runs"]), len(configs) * len(seeds)
    lines = [
        f"- {done} of {planned} planned runs done ({len(configs)} configs x {len(seeds)} seeds)."
    ]
    cpus = {(r["build"]["cpu"], " ".join(r["build"]["cpu_flags"])) for r in study["runs"]}
    threads = ", ".join(str(t) for t in sorted({r["threads"] for r in study["runs"]}))
    for csrc in sorted({r["build"]["csrc"][:7] for r in study["runs"]}):
        runs = [r for r in study["runs"] if r["build"]["csrc"][:7] == csrc]
        commits = ", ".join(sorted({r["build"]["commit"][:7] for r in runs}))
        lines.append(
            f"- Ops build: csrc tree {csrc} ({len(runs)} run{'s' * (len(runs) != 1)}; "
            f"commit {commits}); OMP threads: {threads}."
        )
    for cpu, flags in sorted(cpus):
        lines.append(f"- CPU: {cpu}; SIMD flags: {flags}.")
    dates = sorted(r["date"] for r in study["runs"] if "date" in r)
    if dates:
        lines.append(f"- Runs finished between {dates[0]} and {dates[-1]}.")
    times = []
    for c in configs:
        runs = [r for r in study["runs"] if r["config"] == c]
        times.append(
            f"{statistics.median([r['s_per_iter'] for r in runs]):.2f} s/iter, "
            f"{statistics.median([r['wall_s'] for r in runs]):.0f} s"
            if runs
            else "–"
        )
    time_row = "| median time a run | " + " | ".join(times) + " |"
    lines += ["", "Box AP (mask AP) per seed on the validation split (`dcnv2_shapes_val`):", ""]
    lines += _ap_tables(study, None, time_row)
    noise = study.get("eval_noise")
    if noise:
        lines += ["", _noise_line(noise, "validation split")]
    if any("test" in r for r in study["runs"]):
        images = study.get("eval_noise_test", {}).get("images")
        size = f"{images}-image " if images else ""
        lines += [
            "",
            f"The same models on the {size}test split (`{TEST_SPLIT}`, held out like the "
            "validation split, evaluated with `--eval-only` after each run), where the images "
            "drawn move the AP less: the spread between seeds there is the training's own.",
            "",
        ]
        lines += _ap_tables(study, "test")
        noise = study.get("eval_noise_test")
        if noise:
            lines += ["", _noise_line(noise, "test split")]
    reruns = study.get("reruns", [])
    if reruns:
        lines += ["", "Reruns of recorded runs with the tool (box AP on the validation split):", ""]
        for e in reruns:
            build = "the same ops build" if e["same_ops_build"] else f"csrc tree {e['csrc'][:7]}"
            lines.append(
                f"- {e['config']} seed {e['seed']}: {e['recorded']:.3f} recorded, "
                f"{e['now']:.3f} again ({e['difference'] or 0.0:+.3f}), {build}, commit "
                f"{e['commit'][:7]}, {e['date']}."
            )
    if plot_path and study["runs"]:
        rel = os.path.relpath(REPO / plot_path, (REPO / PAGE).parent)
        lines += ["", f"![box AP per seed and config, one line per seed]({rel})"]
    return "\n".join(lines) + "\n"


def update_page(text, block):
    """``text`` with the part between the seed-study markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{PAGE}: expected one {BEGIN} ... {END} pair")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def plot(study, path):
    """Box AP per config, one line per seed joining its runs, and each config's mean ± std: one
    panel for the validation split and, once runs have it, one for the test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = study["plan"]["configs"]
    panels = [(None, "dcnv2_shapes_val")]
    if any("test" in r for r in study["runs"]):
        panels.append(("test", TEST_SPLIT))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 4), dpi=100, sharey=True, squeeze=False
    )
    for ax, (split, name) in zip(axes[0], panels):
        box = by_config(study, split=split)
        for s in study["plan"]["seeds"]:
            xs = [i for i, c in enumerate(configs) if s in box[c]]
            ax.plot(xs, [box[configs[i]][s] for i in xs], "o-", alpha=0.7, label=f"seed {s}")
        for i, c in enumerate(configs):
            if len(box[c]) > 1:
                mean, std = mean_std(list(box[c].values()))
                ax.errorbar(i + 0.12, mean, yerr=std, fmt="ks", capsize=4)
        ax.set_xticks(range(len(configs)), [LABELS[c] for c in configs])
        ax.set_ylabel(f"box AP ({name})")
        ax.set_title(f"box AP per seed on {name} (black: mean ± std)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- evaluation noise -------------------------------------------------------------------------


def eval_noise(run_dir, subset, split="val"):
    """Box AP of one run's saved detections on the ``split`` ("val": its validation split, or
    "test": the test split it was evaluated on with :meth:`TrainNetRunner.evaluate`) on disjoint
    ``subset``-image slices, and on all images."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from projects_dcnv2.data.shapes import generate_shapes_dataset

    dataset = f"dcnv2_shapes_{split}"
    gt_path = (
        Path(generate_shapes_dataset(splits=[split])) / "annotations" / f"instances_{split}.json"
    )
    folder = Path(run_dir) if split == "val" else Path(run_dir) / dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dets = gt.loadRes(str(folder / "inference" / "coco_instances_results.json"))

    def ap(image_ids):
        e = COCOeval(gt, dets, "bbox")
        e.params.imgIds = image_ids
        with contextlib.redirect_stdout(io.StringIO()):
            e.evaluate(), e.accumulate(), e.summarize()
        return 100 * e.stats[0]

    ids = sorted(gt.getImgIds())
    chunks = [ids[i : i + subset] for i in range(0, len(ids) - subset + 1, subset)]
    return {
        "dataset": dataset,
        "subset": subset,
        "images": len(ids),
        "full": ap(ids),
        "aps": [ap(c) for c in chunks],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--configs", nargs="+", default=["plain", "mdconv", "dcnv2"], choices=CONFIGS
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--json", default="docs/seed_study_shapes.json", help="the study's record")
    parser.add_argument("--workdir", default="output/seed_study", help="runs, initial states, data")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--render", action="store_true", help=f"write {PAGE}'s block and {PLOT}")
    parser.add_argument("--rerun", nargs=2, metavar=("CONFIG", "SEED"))
    parser.add_argument("--eval-noise", nargs=2, metavar=("CONFIG", "SEED"))
    parser.add_argument("--subset", type=int, default=100, help="images per --eval-noise slice")
    parser.add_argument(
        "--split", choices=["val", "test"], default="val", help="the split --eval-noise slices"
    )
    parser.add_argument(
        "--eval-test",
        action="store_true",
        help=f"evaluate every recorded run lacking it on {TEST_SPLIT} (training it again first "
        "when its checkpoint is gone, and checking the validation AP against the record)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra train_net.py KEY VALUE pairs")
    args = parser.parse_args(argv)
    json_path = REPO / args.json
    workdir = REPO / args.workdir
    # Each study generates its own copy of the shapes data set (a stale copy of another size
    # would be used silently otherwise).
    os.environ["DETECTRON2_DATASETS"] = str(workdir / "datasets")
    runner = TrainNetRunner(workdir, args.threads, args.opts)

    if args.render:
        study = load_study(json_path)
        page = REPO / PAGE
        page.write_text(update_page(page.read_text(), render_markdown(study)))
        plot(study, REPO / PLOT)
        print(f"wrote {PAGE} and {PLOT}")
    elif args.rerun:
        config, seed = args.rerun[0], int(args.rerun[1])
        if not runner.init_path(seed).exists():
            initial_state(seed, runner.init_path(seed), args.opts)
        if not rerun(json_path, config, seed, runner):
            sys.exit(1)
    elif args.eval_noise:
        config, seed = args.eval_noise[0], int(args.eval_noise[1])
        study = load_study(json_path)
        noise = eval_noise(runner.run_dir(config, seed), args.subset, args.split)
        key = "eval_noise" if args.split == "val" else "eval_noise_test"
        study[key] = {"config": config, "seed": seed, **noise}
        save_study(json_path, study)
        print(json.dumps(study[key]))
    elif args.eval_test:
        for seed in sorted({r["seed"] for r in load_study(json_path)["runs"]}):
            if not runner.init_path(seed).exists():
                initial_state(seed, runner.init_path(seed), args.opts)
        left = fill_test(json_path, runner, runner.evaluate)
        if left:
            sys.exit(f"seed_study: not reproduced within 0.1 AP, left without a test AP: {left}")
    else:
        run_study(
            json_path, args.configs, args.seeds, runner, make_prepare(runner, args.opts),
            runner.evaluate,
        )  # fmt: skip


if __name__ == "__main__":
    main()
