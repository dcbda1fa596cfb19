"""Generation throughput: the Ray Data pipeline vs a plain single-process diffusers loop.

    .venv/bin/python benchmarks/generation.py                    # prints the figures
    .venv/bin/python benchmarks/generation.py --write-results    # and updates benchmarks/RESULTS.md
    # the real size on a GPU (benchmarks/gpu.sh): SD 2.1-base architecture, random weights
    python benchmarks/generation.py --pipeline sd21-random --device cuda --dtype fp16 \
        --resolution 512 --steps 50 --batch-size 8 --runs plain,ray1 --json gen-b8.json

Same items (the first --classes classes of cars, --per-class images each), same pipeline folder,
same inference batches and shard files in all runs; only the execution differs:
- plain:   one Python process, `generate_shard` + `write_shard` in a loop (torch uses every core);
- ray x1:  `regft.generate.generate_dataset` with one CPU actor holding every core;
- ray x2:  two actors sharing the cores (torch threads split between them).
Times are wall clock from "start generating" to "last shard committed": the plain loop includes
loading the pipeline, the Ray runs include starting the actors (imports + pipeline load) but not
`ray.init`. "steady" leaves out the start-up: images after the first shard / time from the first
to the last shard.

The pipeline (`--pipeline bench`, the default) is a randomly initialised Stable Diffusion
architecture sized for a CPU (SD 2.1's exact weights are 865 M UNet parameters, minutes per image
here), big enough that per-image compute dominates Ray's per-shard overhead. `--pipeline
sd21-random` is SD 2.1-base's real architecture with seeded random weights (regft.realsize, the
generator option `weights: random`): the real cost per image, for a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray runs its workers at niceness 15; on a shared machine that alone would slow the actors
# against the plain loop (niceness 0). Same priority for both, so only the execution differs.
os.environ.setdefault("RAY_worker_niceness", "0")

import numpy as np  # noqa: E402

from regft import raylocal  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Generation"


def build_bench_pipeline(resolution: int, seed: int = 0):
    """A CPU-sized Stable Diffusion pipeline (same classes as SD 2.1, smaller widths)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from regft.tiny_diffusion import clip_bpe_vocab_and_merges

    vocab, merges = clip_bpe_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 128), layers_per_block=1, sample_size=resolution // 8,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=16, sample_size=resolution,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=64,
        intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77,
    ))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    sizes = {name: sum(p.numel() for p in m.parameters())
             for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    return pipe, sizes


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def pipeline_for(args, work: Path) -> tuple[str, dict, dict, int]:
    """(generator name or folder, generator options, parameter counts, output size)."""
    if args.pipeline == "sd21-random":
        from regft import realsize

        counts = realsize.parameter_counts()
        sizes = {k: counts[k] for k in ("unet", "vae", "text_encoder")}
        # the real job's output size: 224 px for SD models (GenerationConfig's default)
        return realsize.SD21_BASE, {"weights": realsize.RANDOM}, sizes, None
    pipe, sizes = build_bench_pipeline(args.resolution)
    folder = str(work / "bench-sd")
    pipe.save_pretrained(folder)
    return folder, {}, sizes, args.resolution


def steady(times: list[float], rows: int, total: int) -> float:
    """Images/s between the first and the last shard (start-up excluded)."""
    times = sorted(times)
    return (total - rows) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


RUNS = {"plain": "plain", "ray1": "ray x1", "ray2": "ray x2"}  # --runs name -> table label


def run_plain(cfg, folder: str, store: str, tag: str, device: str = "cpu") -> dict:
    from regft import store as st
    from regft.generate import check_request, chunk, generate_shard
    from regft.generators import make_generator
    from regft.prompts import make_items

    task, _ = check_request(cfg)
    items = make_items(task.name, list(task.gen_names), task.generation_template,
                       cfg.images_per_class, cfg.seed, cfg.prompt_strategy)
    path = os.path.join(store, tag)
    t0 = time.perf_counter()
    gen = make_generator(folder, resolution=cfg.resolution, steps=cfg.steps, guidance=cfg.guidance,
                         device=device, dtype=cfg.dtype, options=cfg.generator_options)
    gen.load()
    times = []
    for k, shard in enumerate(chunk(items, cfg.shard_size)):
        st.write_shard(path, k, generate_shard(gen, shard, cfg.batch_size, cfg.output_size))
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return {"wall": wall, "ips": len(items) / wall,
            "steady": steady(times, cfg.shard_size, len(items)), "path": path}


def run_ray(cfg, actors: int, store: str, tag: str) -> dict:
    import dataclasses

    from regft.generate import generate_dataset

    c = dataclasses.replace(cfg, num_actors=actors, store=os.path.join(store, tag))
    res = generate_dataset(c)
    assert res.generated == res.total
    return {"wall": res.seconds, "ips": res.images_per_s,
            "steady": steady(res.shard_times, cfg.shard_size, res.total), "path": res.path}


def images(path: str) -> dict:
    import pyarrow.parquet as pq

    from regft import store as st

    out = {}
    for f in sorted(Path(path).glob("shards/*.parquet")):
        t = pq.read_table(f)
        for i, b in zip(t.column("item_id").to_pylist(), t.column("image").to_pylist()):
            out[i] = np.asarray(st.decode_image(b)).astype(np.int16)
    return out


def compare(a: dict, b: dict) -> str:
    if set(a) != set(b):
        return "different item sets"
    diffs = [np.abs(a[k] - b[k]) for k in a]
    if all(d.max() == 0 for d in diffs):
        return "bit-identical"
    frac = float(np.mean([(d > 0).mean() for d in diffs]))
    return f"max diff {max(int(d.max()) for d in diffs)}/255 on {100 * frac:.4f} % of pixels"


def write_results(text: str) -> None:
    """Replace (or append) only the '## Generation' section of RESULTS.md."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == HEADING), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    RESULTS.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2,
                   help="interleaved repetitions (plain, ray x1, ray x2, plain, ...); medians reported")
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"),
                   help="OMP_WAIT_POLICY for the plain loop and the actors alike. On a shared, "
                        "oversubscribed machine spinning OpenMP threads made 2-thread runs 4-10x "
                        "slower and erratic; PASSIVE keeps the comparison about execution")
    p.add_argument("--pipeline", choices=("bench", "sd21-random"), default="bench",
                   help="bench: the CPU-sized pipeline above; sd21-random: SD 2.1-base's real "
                        "architecture with random weights")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the plain loop on cuda:0, the Ray actors on one GPU each")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp16, fp32, bf16")
    p.add_argument("--runs", default="plain,ray1,ray2",
                   help=f"comma-separated subset of {', '.join(RUNS)}; plain always runs (the baseline)")
    p.add_argument("--json", help="also write the figures as JSON to this file")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    runs_wanted = ["plain"] + [r for r in args.runs.split(",") if r in RUNS and r != "plain"]
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if args.omp_wait_policy:  # before torch starts OpenMP and before Ray starts its workers
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy

    import ray
    import torch

    from regft.generate import GenerationConfig

    work = Path(tempfile.mkdtemp(prefix="regft-genbench-"))
    try:
        folder, options, sizes, output_size = pipeline_for(args, work)
        cfg = GenerationConfig(
            task="cars", max_classes=args.classes, generator=folder,
            images_per_class=args.per_class, resolution=args.resolution,
            output_size=output_size, steps=args.steps, batch_size=args.batch_size,
            shard_size=args.shard_size, progress=False, samples=False,
            use_gpu=args.device == "cuda", dtype=args.dtype, generator_options=options)
        n = args.classes * args.per_class
        ncpu = os.cpu_count()
        raylocal.init("local", num_cpus=ncpu, dashboard=False, quiet=True)  # GPUs: detected
        print(f"{n} images, {args.resolution} px, {args.steps} steps, batch {args.batch_size}, "
              f"shards of {args.shard_size}; {ncpu} CPUs, torch threads {torch.get_num_threads()}")
        trials: dict[str, list[dict]] = {RUNS[r]: [] for r in runs_wanted}
        for r in range(args.repeats):
            for name in trials:
                tag = f"{name.replace(' ', '')}-{r}"
                if name == "plain":
                    res = run_plain(cfg, folder, str(work), tag, args.device)
                else:
                    res = run_ray(cfg, int(name[-1]), str(work), tag)
                trials[name].append(res)
                print(f"[{r}] {name}: {res['ips']:.2f} img/s (steady {res['steady']:.2f}), "
                      f"load avg {os.getloadavg()[0]:.1f}", flush=True)
        ray.shutdown()
        base = images(trials["plain"][0]["path"])
        same = {k: compare(images(v[0]["path"]), base) for k, v in trials.items() if k != "plain"}
        runs = {k: {m: float(np.median([t[m] for t in v])) for m in ("wall", "ips", "steady")}
                for k, v in trials.items()}
        spread = {k: (min(t["ips"] for t in v), max(t["ips"] for t in v)) for k, v in trials.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    params = sum(sizes.values()) / 1e6
    import diffusers

    cmd = "python benchmarks/generation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = [
        "| run | wall s | images/s (min-max) | vs plain | steady images/s | vs plain | "
        "pixels vs plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for k, v in runs.items():
        lo, hi = spread[k]
        rows.append(
            f"| {k} | {v['wall']:.1f} | {v['ips']:.2f} ({lo:.2f}-{hi:.2f}) | "
            f"{v['ips'] / runs['plain']['ips']:.2f}x | {v['steady']:.2f} | "
            f"{v['steady'] / runs['plain']['steady']:.2f}x | {same.get(k, '-')} |")
    machine = " ".join(filter(None, (platform.machine(), platform.processor())))
    text = "\n".join([
        HEADING,
        "",
        f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d')}).",
        f"Machine: {machine}, {ncpu} CPU cores, {gpu_name()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, ray {ray.__version__}.",
        f"Pipeline: StableDiffusionPipeline, random weights, {params:.1f} M parameters (UNet "
        f"{sizes['unet'] / 1e6:.1f} M, VAE {sizes['vae'] / 1e6:.1f} M, text encoder "
        f"{sizes['text_encoder'] / 1e6:.1f} M), {args.resolution} px, {args.steps} PNDM steps, "
        f"guidance 5.0, dtype {args.dtype} on {args.device}. "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}.",
        f"Work: {n} images ({args.classes} classes x {args.per_class}), inference batch "
        f"{args.batch_size}, shards of {args.shard_size}, PNG into parquet on local disk.",
        f"Medians of {args.repeats} interleaved repetitions; the machine is shared (load average "
        f"{os.getloadavg()[0]:.1f} at the end), so treat differences under ~10 % as noise.",
        "",
        *rows,
        "",
        "Wall = start generating -> last shard committed (plain: includes pipeline load; Ray: "
        "includes actor start-up and pipeline load, not `ray.init`). Steady = images after the "
        "first shard / time between first and last shard. Pixel differences, where any, are "
        "float rounding of oneDNN convolutions under another torch thread count (see "
        "regft/generators.py). Ray workers ran at niceness 0 like the plain loop "
        "(RAY_worker_niceness=0; Ray's default is 15).",
        "",
    ])
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "pipeline": args.pipeline, "device": args.device, "gpu": gpu_name(), "dtype": args.dtype,
            "resolution": args.resolution, "steps": args.steps, "batch_size": args.batch_size,
            "images": n, "parameters": sizes, "runs": runs,
            "images_per_s_range": {k: list(v) for k, v in spread.items()}, "pixels_vs_plain": same,
        }, indent=1))
    if args.write_results:
        write_results(text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
