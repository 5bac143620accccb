"""Does a mixed_bfloat16 run train as well as a float32 one? The same run in both, one after the other.

    python -m bench.precision                       # SRGAN and Swift-SRGAN x4, 400 pixel-loss steps; writes the "precision" section
    python -m bench.precision --models srgan --steps 200 --no_write

``bench.train_step`` measures what ``--precision=mixed_bfloat16`` saves in a step; this
measures what it costs. For each model the same ``loop.train`` run (the embedded sample
set, ``train.py``'s defaults but ``--steps`` pixel-loss steps and no warm-up, seed 0) is made under
float32 and under mixed_bfloat16, each in a fresh subprocess. Each saved generator (float32
whatever the run computed in: ``loop.float32_copy``) is then evaluated on the sample
set's validation split with ``sr_tf.evaluation``, as ``evaluate.py`` would: PSNR and SSIM
against the true HR images, beside bicubic's. The wall times are of the training loop
(validation included), one run after the other, so their ratio is noisier than
``bench.train_step``'s.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("srgan", "swift_srgan", "residual_cnn")
PRECISIONS = ("float32", "mixed_bfloat16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["srgan", "swift_srgan"], choices=NAMES)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--records", default=os.path.join(ROOT, "tfrecords", "samples"))
    parser.add_argument("--no_write", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "PRECISION", "RUN_DIR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def one_run(name, precision, run_dir, args):
    """Train ``name`` under ``precision`` into ``run_dir`` and evaluate what it saved;
    prints one JSON line."""
    from sr_tf import evaluation, inference
    from sr_tf.training import loop

    config = loop.TrainConfig(model=name, scale=args.scale, data=args.records, run_dir=run_dir, steps=args.steps,
                              pretrain_steps=args.steps, precision=precision, eval_every=args.steps,
                              checkpoint_every=args.steps, progress=False, seed=0)
    result = loop.train(config)
    with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as f:
        seconds = json.load(f)["train_seconds"]
    predictor = inference.load_predictor(os.path.join(run_dir, "generator.keras"))
    eval_config = evaluation.EvalConfig(data=args.records, split="val", scale=args.scale, figures=0)
    _, summary = evaluation.run(predictor, eval_config, os.path.join(run_dir, "evaluation"), progress=False)
    pooled = summary["all"]
    print(json.dumps({"model": name, "precision": precision, "seconds": seconds, "steps": result["step"],
                      "trained_in": result["generator"].compute_dtype, "saved_in": predictor.model.compute_dtype,
                      "n": pooled["model"]["n"],
                      "psnr": pooled["model"]["psnr"], "ssim": pooled["model"]["ssim"],
                      "bicubic_psnr": pooled["bicubic"]["psnr"], "bicubic_ssim": pooled["bicubic"]["ssim"]}))


def markdown(rows, args):
    from bench.report import machine
    from sr_tf import zoo

    cpu = zoo.machine()
    lines = [
        "## Training in mixed_bfloat16 against float32: same run, same data",
        "",
        f"`python -m bench.precision` on {machine()} ({cpu['cpu']}; {', '.join(cpu['vector_extensions'])}), "
        f"TensorFlow {cpu['tensorflow']}. Each model trained {args.steps} pixel-loss steps at x{args.scale} "
        "(train.py's defaults otherwise, but no warm-up: batch 16, HR patch 96, L1, cosine schedule, weight "
        "average, augmentation; seed 0) on the embedded sample set under each precision, one run after the other; "
        f"the saved generator (float32 in both) evaluated on the sample set's validation split ({rows[0]['n']} "
        "images). The loop's wall time includes its input pipeline, validation and weight average, which "
        "bfloat16 does not speed up; `bench.train_step` times the step alone.",
        "",
        "| model | precision | training loop s | speed-up | PSNR / SSIM | bicubic | PSNR change |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    for name in args.models:
        runs = {row["precision"]: row for row in rows if row["model"] == name}
        base = runs["float32"]
        for precision in PRECISIONS:
            row = runs[precision]
            speed = "" if precision == "float32" else f"{base['seconds'] / row['seconds']:.2f}x"
            change = "" if precision == "float32" else f"{row['psnr'] - base['psnr']:+.2f} dB"
            lines.append(f"| {name} | {precision} | {row['seconds']:,.0f} | {speed} | {row['psnr']:.2f} / "
                         f"{row['ssim']:.4f} | {row['bicubic_psnr']:.2f} / {row['bicubic_ssim']:.4f} | {change} |")
    return "\n".join(lines)


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    if args.one:
        one_run(*args.one, args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            for precision in PRECISIONS:
                run_dir = os.path.join(scratch, f"{name}_{precision}")
                command = [sys.executable, "-m", "bench.precision", "--one", name, precision, run_dir,
                           "--steps", str(args.steps), "--scale", str(args.scale), "--records", args.records]
                print(f"{name} {precision}: training {args.steps} steps", flush=True)
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{name} {precision} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"  {rows[-1]}", flush=True)
    text = markdown(rows, args)
    print(text)
    if not args.no_write:
        from bench.report import update_section

        update_section("precision", text)


if __name__ == "__main__":
    main()
