"""Data preparation throughput, and a launch's time to its first step on a prepared dataset, in one run.

1. Build a corpus locally (nothing from the network): the ``.py`` files under
   ``sysconfig``'s stdlib directory (with a pyenv interpreter that includes its
   ``site-packages``) and the pydoc help topics, shuffled and repeated to
   ``--size-mb`` of text, as equal JSONL files (one document per line) and a
   tenth of it as plain ``.txt`` files (a few hundred documents back to back in
   each, one document per file), all in one directory.
2. Train one byte-level BPE (vocabulary 2048, the benchmarks' model) on a
   bounded sample (``tokenizer_sample``, ``--tokenizer-sample-mb``); every row
   below uses that ``tokenizer.json`` (``--tokenizer``), so no row trains one.
3. Raw-text MB/s (the documents' UTF-8 bytes, as the shard records count them) of:
   - **ceiling**: HF ``tokenizers`` ``encode_batch`` (batches of 512, as
     ``prepare`` does) over the same documents held in memory, in this process,
     with ``RAYON_NUM_THREADS=1`` and ``TOKENIZERS_PARALLELISM=false`` set before
     ``tokenizers`` is imported (the latter makes ``encode_batch`` serial);
   - **1 worker**: ``raylm data prepare DIR --workers 1`` (it tokenizes in its own
     process) with the same two variables in its environment: one core;
   - **every core**: ``raylm data prepare DIR --workers <nproc>`` (an embedded
     Ray cluster of that many CPUs, one task per input file; raylm sets the two
     variables in every task itself), into a new directory;
   - **rerun**: the same command again on unchanged inputs (seconds);
   each from the command's start to its exit ("wall") and over the tokenizing
   window alone (first shard file opened -> ``manifest.json`` written, polled
   every 50 ms), with the CPU seconds and peak resident set (``VmHWM``) of the
   processes doing the work (polled with psutil every 100 ms), and the load
   average around it.
4. ``raylm launch`` (2 workers, 3 steps) on a mixture of two prepared datasets:
   the throughput run's shards listed ``--launch-copies`` times (hard links under
   other names: the launch's cost depends on the shards, not on how they were
   made) with weight 0.9, and two of them as a second dataset with weight 0.1;
   time from the command's start to its first logged training step, and the
   stage's ``timeline_s``.

    .venv/bin/python benchmarks/data_prepare.py --size-mb 120 [--work /tmp/raylm-bench13] [--out DIR]
"""

from __future__ import annotations

import os

# Before tokenizers is imported (the ceiling runs in this process, on one thread).
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import psutil  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_model, pretrain_overrides, write_result  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ONE_CORE = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TXT_SHARE = 0.1
BATCH = 512  # raylm.data.prepare.ENCODE_BATCH_DOCUMENTS


def source_documents() -> List[str]:
    """The .py files under the stdlib directory (site-packages too, where it lies inside) and pydoc topics (UTF-8, non-blank)."""
    from raylm.data.corpus import pydoc_topics

    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
    docs += [text for _, text in pydoc_topics() if text.strip()]
    return docs


def build_corpus(corpus: Path, size_bytes: int, jsonl_files: int, txt_files: int, seed: int = 0) -> Dict[str, int]:
    """Shuffled passes over the documents until ``size_bytes``; JSONL files first, then .txt files."""
    corpus.mkdir(parents=True)
    base = source_documents()
    rng = random.Random(seed)

    def stream():
        while True:
            order = list(base)
            rng.shuffle(order)
            yield from order

    docs = stream()
    jsonl_bytes = int(size_bytes * (1 - TXT_SHARE)) // jsonl_files
    txt_bytes = int(size_bytes * TXT_SHARE) // txt_files
    written = documents = 0
    for i in range(jsonl_files):
        with open(corpus / f"part-{i:03d}.jsonl", "w", encoding="utf-8") as f:
            n = 0
            while n < jsonl_bytes:
                doc = next(docs)
                f.write(json.dumps({"text": doc}) + "\n")
                n += len(doc.encode())
                documents += 1
            written += n
    for i in range(txt_files):
        parts, n = [], 0
        while n < txt_bytes:
            doc = next(docs)
            parts.append(doc)
            n += len(doc.encode()) + 1
        text = "\n".join(parts)
        (corpus / f"text-{i:03d}.txt").write_text(text, encoding="utf-8")
        written += len(text.encode())
        documents += 1
    return {"text_bytes": written, "documents": documents, "distinct_source_documents": len(base),
            "files": jsonl_files + txt_files, "disk_bytes": sum(p.stat().st_size for p in corpus.iterdir())}


class Watch:
    """Polls a command's process tree (CPU seconds, VmHWM) and its output directory (tokenizing window)."""

    def __init__(self, proc: subprocess.Popen, out_dir: Path):
        self.root = psutil.Process(proc.pid)
        self.out_dir = out_dir
        self.cpu: Dict[tuple, float] = {}
        self.hwm: Dict[tuple, int] = {}
        self.kind: Dict[tuple, str] = {}
        self.first_shard: Optional[float] = None
        self.manifest: Optional[float] = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _vmhwm(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        shards = self.out_dir / "shards"
        manifest = self.out_dir / "manifest.json"
        manifest_mtime = manifest.stat().st_mtime if manifest.exists() else None
        last_tree = 0.0
        while not self.stop.is_set():
            now = time.time()
            if self.first_shard is None and shards.is_dir():
                try:
                    if any(p.name.endswith(".bin.tmp") for p in shards.iterdir()):
                        self.first_shard = now
                except OSError:
                    pass
            if self.manifest is None and manifest.exists():
                try:
                    if manifest.stat().st_mtime != manifest_mtime:
                        self.manifest = now
                except OSError:
                    pass
            if now - last_tree >= 0.1:
                last_tree = now
                try:
                    procs = [self.root, *self.root.children(recursive=True)]
                except psutil.Error:
                    procs = []
                for p in procs:
                    try:
                        key = (p.pid, p.create_time())
                        t = p.cpu_times()
                        self.cpu[key] = t.user + t.system
                        self.hwm[key] = max(self.hwm.get(key, 0), self._vmhwm(p.pid))
                        if self.kind.get(key) not in ("driver", "tokenizing_worker"):
                            title = " ".join(p.cmdline())  # a Ray worker's is its task's name ("ray::IDLE" between tasks)
                            self.kind[key] = ("driver" if p.pid == self.root.pid else
                                              "tokenizing_worker" if "_on_one_core" in title or "tokenize_input" in title else
                                              "ray_worker" if title.startswith("ray::IDLE") else "other")
                    except psutil.Error:
                        pass
            time.sleep(0.05)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()

        def of(kind):
            keys = [k for k in self.cpu if self.kind.get(k) == kind]
            return {"processes": len(keys), "cpu_s": round(sum(self.cpu[k] for k in keys), 2),
                    "peak_rss_mb_max": round(max((self.hwm[k] for k in keys), default=0) / 1e6, 1)}

        # "other": Ray's own processes (GCS, raylet, agents); "idle_workers": Ray workers that never ran a shard.
        return {"driver": of("driver"), "tokenizing_workers": of("tokenizing_worker"), "idle_workers": of("ray_worker"), "other": of("other"),
                "tree_cpu_s": round(sum(self.cpu.values()), 2)}


def run_prepare(label: str, corpus: Path, out: Path, tokenizer: Path, workers: int, text_mb: float, env_extra: Dict[str, str], logs: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ONE_CORE}
    env.update(env_extra)
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "raylm.launcher.cli", "data", "prepare", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer), "--workers", str(workers)]
    load_before = os.getloadavg()
    started = time.time()
    with open(logs / f"{label}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        watch = Watch(proc, out)
        rc = proc.wait()
    wall = time.time() - started
    procs = watch.finish()
    if rc != 0:
        raise SystemExit(f"{label} failed (exit {rc}); see {logs / (label + '.log')}")
    tail = (logs / f"{label}.log").read_text().strip().splitlines()[-3:]
    window = (watch.manifest - watch.first_shard) if watch.first_shard and watch.manifest else None
    result = {
        "command": " ".join(cmd[1:]) + ("" if not env_extra else "   (env " + " ".join(f"{k}={v}" for k, v in env_extra.items()) + ")"),
        "wall_s": round(wall, 2),
        "wall_mb_per_s": round(text_mb / wall, 3),
        "tokenizing_window_s": round(window, 2) if window else None,
        "tokenizing_mb_per_s": round(text_mb / window, 3) if window else None,
        "start_to_first_shard_s": round(watch.first_shard - started, 2) if watch.first_shard else None,
        "load_avg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "processes": procs,
        "last_lines": tail,
    }
    worker_cpu = procs["tokenizing_workers"]["cpu_s"] if workers > 1 else procs["driver"]["cpu_s"]
    result["mb_per_worker_cpu_s"] = round(text_mb / worker_cpu, 3) if worker_cpu else None
    if window:
        result["cores_used_in_window"] = round(worker_cpu / window, 2)  # the tokenizing processes' CPU seconds / window
    print(f"[{label}] {json.dumps({k: v for k, v in result.items() if k != 'processes'})}", flush=True)
    return result


def ceiling(corpus: Path, tokenizer_json: Path) -> dict:
    """encode_batch over the same documents, in memory, one thread (this process' environment)."""
    from tokenizers import Tokenizer as HFTokenizer

    from raylm.data.corpus import input_documents, source_inputs

    hf = HFTokenizer.from_file(str(tokenizer_json))
    docs = [d for i in source_inputs([str(corpus)]) for d in input_documents(i, "text") if d.strip()]
    text_bytes = sum(len(d.encode()) for d in docs)
    load_before = os.getloadavg()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), BATCH):
        tokens += sum(len(e.ids) for e in hf.encode_batch(docs[i : i + BATCH], add_special_tokens=False))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    result = {
        "how": "tokenizers.Tokenizer.encode_batch, batches of 512, documents in memory, RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false",
        "documents": len(docs), "text_bytes": text_bytes, "tokens_without_eos": tokens,
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "wall_mb_per_s": round(text_bytes / 1e6 / wall, 3), "mb_per_cpu_s": round(text_bytes / 1e6 / cpu, 3),
        "load_avg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    print(f"[ceiling] {json.dumps(result)}", flush=True)
    return result


def replicate(prepared: Path, dest: Path, copies: int, keep_shards: Optional[int] = None) -> dict:
    """A prepared dataset whose manifest lists ``prepared``'s shards ``copies`` times, as hard links under new names."""
    from raylm.data.meta import write_meta
    from raylm.data.prepare import MANIFEST, SHARDS_DIR, read_manifest

    manifest = read_manifest(prepared)
    records = manifest["shards"][:keep_shards] if keep_shards else manifest["shards"]
    (dest / SHARDS_DIR).mkdir(parents=True)
    shutil.copy(prepared / "tokenizer.json", dest / "tokenizer.json")
    listed = []
    for c in range(copies):
        for r in records:
            name = f"{r['shard']}-copy{c}"
            for suffix in (".bin", ".idx"):
                os.link(prepared / SHARDS_DIR / (r["shard"] + suffix), dest / SHARDS_DIR / (name + suffix))
            record = {**r, "shard": name, "input": f"{r['input']}#copy{c}"}
            write_meta(dest / SHARDS_DIR, record, name=name + ".json")
            listed.append(record)
    new = {**manifest, "shards": listed, "documents": sum(r["documents"] for r in listed), "tokens": sum(r["tokens"] for r in listed)}
    write_meta(dest, new, name=MANIFEST)
    return {"shards": len(listed), "documents": new["documents"], "tokens": new["tokens"],
            "text_mb": round(sum(r["text_bytes"] for r in listed) / 1e6, 1),
            "bin_mb": round(sum(r["tokens"] for r in listed) * 2 / 1e6, 1)}


def launch(big: Path, small: Path, runs: Path, logs: Path) -> dict:
    steps = 3
    overrides = [
        *pretrain_overrides(steps, workers=2, zero=2, log_every=1),
        f"data.sources=[{{path: {big}, weight: 0.9}}, {{path: {small}, weight: 0.1}}]",
        "train.ckpt_every=0",
        f"runs_dir={runs}",
        "name=first-step",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ONE_CORE}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "raylm.launcher.cli", "launch", "tiny", *overrides]
    load_before = os.getloadavg()
    started = time.time()
    with open(logs / "launch.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    wall = time.time() - started
    if rc != 0:
        raise SystemExit(f"launch failed (exit {rc}); see {logs / 'launch.log'}")
    run_dir = runs / "first-step"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_step = next(r["time"] for r in records if r.get("kind") == "train")
    summary = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    timeline = summary.get("timeline_s", {})
    in_fit = sum(timeline.get(k, 0) for k in ("workers_up", "rank_setup", "first_step"))
    result = {
        "command": " ".join(cmd[1:]),
        "launch_to_first_step_s": round(first_step - started, 2),
        "before_fit_s": round(first_step - started - in_fit, 2),
        "timeline_s": timeline,
        "wall_s": round(wall, 2),
        "load_avg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    data_dir = run_dir / "data" / "pretrain"
    result["blend_files"] = sorted(str(p.relative_to(data_dir)) for p in (data_dir / "blend").rglob("*.npy")) if (data_dir / "blend").is_dir() else []
    print(f"[launch] {json.dumps(result)}", flush=True)
    return result


def data_build_alone(big: Path, small: Path, scratch: Path) -> dict:
    """What the launch's driver does with the data, timed here cold: held-out split of each source, blend."""
    from raylm.configs.loader import load_config, resolve_stage
    from raylm.data import prepare_dataset

    run = load_config("tiny", [*pretrain_overrides(3, workers=2, zero=2), f"data.sources=[{{path: {big}, weight: 0.9}}, {{path: {small}, weight: 0.1}}]"])
    cfg = resolve_stage(run, 0)
    began = time.perf_counter()
    train, val, _ = prepare_dataset("pretrain", cfg.data, cfg.model, scratch, cfg.train.seed)
    cold = time.perf_counter() - began
    began = time.perf_counter()
    prepare_dataset("pretrain", cfg.data, cfg.model, scratch, cfg.train.seed)
    warm = time.perf_counter() - began
    return {"cold_s": round(cold, 3), "cached_s": round(warm, 3), "train_samples": train.num_samples, "val_samples": val.num_samples}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=float, default=120.0, help="raw text of the corpus, MB (1e6 bytes)")
    parser.add_argument("--jsonl-files", type=int, default=16)
    parser.add_argument("--txt-files", type=int, default=8)
    parser.add_argument("--tokenizer-sample-mb", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="the 'every core' row (default: nproc)")
    parser.add_argument("--launch-copies", type=int, default=0, help="times the shards are listed for the launch (default: enough for 1 GB of text)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/raylm-bench13"), help="scratch directory (deleted at the end unless --keep)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from raylm.data.prepare import tokenizer_sample
    from raylm.data.tokenizer import train_tokenizer

    if args.work.exists():
        shutil.rmtree(args.work)
    logs = args.work / "logs"
    logs.mkdir(parents=True)
    result: dict = {"machine": {"nproc": os.cpu_count(), "cpu_model": cpu_model()}, "size_mb_asked": args.size_mb,
                    "began_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        corpus = args.work / "corpus"
        began = time.perf_counter()
        result["corpus"] = build_corpus(corpus, int(args.size_mb * 1e6), args.jsonl_files, args.txt_files)
        result["corpus"]["build_s"] = round(time.perf_counter() - began, 1)
        text_mb = result["corpus"]["text_bytes"] / 1e6
        print(f"[corpus] {json.dumps(result['corpus'])}", flush=True)

        from raylm.data.corpus import source_inputs

        began = time.perf_counter()
        tokenizer = train_tokenizer(tokenizer_sample(source_inputs([str(corpus)]), "text", int(args.tokenizer_sample_mb * (1 << 20))), "bpe", 2048)
        tokenizer.save(args.work / "tokenizer")
        tokenizer_json = args.work / "tokenizer" / "tokenizer.json"
        result["tokenizer"] = {"kind": "byte-level BPE", "vocab_size": tokenizer.vocab_size, "sample_mb": args.tokenizer_sample_mb,
                               "train_s_one_thread": round(time.perf_counter() - began, 1)}

        result["ceiling"] = ceiling(corpus, tokenizer_json)
        assert result["ceiling"]["text_bytes"] == result["corpus"]["text_bytes"]
        result["prepare_1_worker"] = run_prepare("prepare_1_worker", corpus, args.work / "prepared-1", tokenizer_json, 1, text_mb, ONE_CORE, logs)
        result["prepare_all_cores"] = run_prepare(f"prepare_{args.workers}_workers", corpus, args.work / "prepared", tokenizer_json, args.workers, text_mb, {}, logs)
        result["rerun_unchanged"] = run_prepare("rerun_unchanged", corpus, args.work / "prepared", tokenizer_json, args.workers, text_mb, {}, logs)

        from raylm.data.prepare import read_manifest

        one, many = read_manifest(args.work / "prepared-1"), read_manifest(args.work / "prepared")
        assert one["tokens"] == many["tokens"] and sum(r["text_bytes"] for r in many["shards"]) == result["corpus"]["text_bytes"]
        result["prepared"] = {"shards": len(many["shards"]), "documents": many["documents"], "tokens": many["tokens"],
                              "text_bytes_per_token": round(result["corpus"]["text_bytes"] / many["tokens"], 3)}
        shutil.rmtree(args.work / "prepared-1")

        c, w, one_w = result["ceiling"], result["prepare_all_cores"], result["prepare_1_worker"]
        result["ratios"] = {
            "one_worker_over_ceiling_wall": round(one_w["wall_mb_per_s"] / c["wall_mb_per_s"], 3),
            "one_worker_over_ceiling_tokenizing": round(one_w["tokenizing_mb_per_s"] / c["wall_mb_per_s"], 3),
            "one_worker_over_ceiling_per_cpu_s": round(one_w["mb_per_worker_cpu_s"] / c["mb_per_cpu_s"], 3),
            "all_cores_over_one_worker_wall": round(w["wall_mb_per_s"] / one_w["wall_mb_per_s"], 3),
            "all_cores_over_one_worker_tokenizing": round(w["tokenizing_mb_per_s"] / one_w["tokenizing_mb_per_s"], 3),
            "rerun_s": result["rerun_unchanged"]["wall_s"],
        }
        print(f"[ratios] {json.dumps(result['ratios'])}", flush=True)

        copies = args.launch_copies or max(1, -(-1000 // int(text_mb)))
        big, small = args.work / "launch-big", args.work / "launch-small"
        result["launch_dataset"] = {"big": replicate(args.work / "prepared", big, copies), "copies": copies,
                                    "small": replicate(args.work / "prepared", small, 1, keep_shards=2)}
        result["launch_data_alone"] = data_build_alone(big, small, args.work / "data-alone")
        result["launch"] = launch(big, small, args.work / "runs", logs)
        result["ended_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    finally:
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copytree(logs, args.out / "logs", dirs_exist_ok=True)
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    write_result(args.out, "data_prepare", result)


if __name__ == "__main__":
    main()
