"""SRGAN / Swift-SRGAN training steps on a CPU: the former step against each speed-up, in one run.

    python -m bench.train_step                      # both GANs, both phases; writes the "train_step" section
    python -m bench.train_step --models swift_srgan --no_write

Every configuration but ``all, mixed_bfloat16`` computes the same function on the same batch (global batch 16, HR
patch 96, x4, the default strategy): the trainers come from
``sr_tf.training.loop.build`` with ``train.py``'s losses, and the step is the loop's
own (``loop.distributed_step``: the trainer's ``train_step`` under ``strategy.run`` in a
``tf.function``, here on one device). The configurations:

- ``former``: the step as it was: Keras' own batch normalisation and PReLU, the tail
  after the last pixel shuffle (``fused_batch_norm=False, fused_prelu=False,
  tail_before_shuffle=False``, generator and discriminator), and the perceptual loss's
  backbone run once on targets and predictions joined (``JoinedPerceptualLoss``);
- ``+ fused BN``: batch normalisation trained with TensorFlow's fused kernel;
- ``+ tail before shuffle``: the last PReLU and 9x9 tail run before the final pixel
  shuffle (``SRResNet.rearranged_tail``);
- ``+ fused PReLU``: PReLU trained with its hand-written gradient (``blocks.FusedPReLU``);
- ``+ split perceptual``: targets and predictions through the backbone in two calls
  (``losses.PerceptualLoss``), so that its backward pass runs through the predictions
  only (adversarial phase; the pixel phase has no perceptual term);
- ``+ folded backbone BN``: the frozen perceptual backbone's batch normalisations folded
  into the convolutions before them (``losses.fold_batch_norms``: MobileNetV2's 40;
  VGG19 has none, so for SRGAN it is the former step again; adversarial phase only);
- ``all`` (today's default);
- ``all, mixed_bfloat16``: the default under ``--precision=mixed_bfloat16`` (float32
  variables, convolutions in bfloat16 where the CPU has BF16 instructions). Not the same
  function to float32 rounding, so not counted for the target: reported beside it;
- ``former, XLA``: the former pixel-loss step compiled with ``jit_compile=True`` (timed
  over fewer windows: each call is slow).

Both phases are measured: ``pixel`` (the pre-training step: pixel loss only, no
perceptual term) and
``adversarial`` (generator and discriminator, with the perceptual loss on the random
frozen backbone: the ImageNet weights are not cached here, and cost the same). The
configurations alternate window by window; each ratio is the median over windows of the
ratio within one window, which cancels most of the load that changes between windows.
"""

import argparse
import os
import statistics
import sys
import time

from bench.train import timed_window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("swift_srgan", "srgan")
FORMER = {"fused_batch_norm": False, "tail_before_shuffle": False, "fused_prelu": False}
JOINED = "joined_perceptual"  # not model options: the bench swaps the former perceptual loss in
FOLDED = "folded_perceptual_bn"
POLICY = "policy"
LOSS_OPTIONS = (JOINED, FOLDED, POLICY)  # options of the step that are not the model's
CONFIGS = {
    "former": {**FORMER, JOINED: True, FOLDED: False},
    "+ fused BN": {**FORMER, "fused_batch_norm": True, JOINED: True, FOLDED: False},
    "+ tail before shuffle": {**FORMER, "tail_before_shuffle": True, JOINED: True, FOLDED: False},
    "+ fused PReLU": {**FORMER, "fused_prelu": True, JOINED: True, FOLDED: False},
    "+ split perceptual": {**FORMER, JOINED: False, FOLDED: False},
    "+ folded backbone BN": {**FORMER, JOINED: True, FOLDED: True},
    "all": {"fused_batch_norm": True, "tail_before_shuffle": True, "fused_prelu": True, JOINED: False, FOLDED: True},
}
DEFAULT = "all"
BFLOAT16 = "all, mixed_bfloat16"
CONFIGS[BFLOAT16] = {**CONFIGS[DEFAULT], POLICY: "mixed_bfloat16"}
FOLDED_LABEL = "+ folded backbone BN"
PIXEL_ONLY_SKIPS = ("+ split perceptual", FOLDED_LABEL)  # the pixel phase has no perceptual term: the former step
XLA = "former, XLA"
TARGET = 1.5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(NAMES), choices=NAMES)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--patch_size", type=int, default=96)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window_seconds", type=float, default=3.0)
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the former step under XLA")
    parser.add_argument("--no_write", action="store_true")
    return parser.parse_args(argv)


class JoinedPerceptualLoss:
    """The former perceptual loss: the backbone run once on targets and predictions joined
    in one batch, the targets' half stopped after it (so the backward pass still ran
    through both halves). The same values as ``losses.PerceptualLoss``."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, y_true, y_pred):
        from keras import ops

        batch = ops.shape(y_true)[0]
        both = self.loss.features(ops.concatenate([ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")], axis=0))
        target, prediction = ops.stop_gradient(both[:batch]), both[batch:]
        return self.loss.weight * ops.mean(ops.square(prediction - target), axis=(1, 2, 3))


def measure(name, args):
    """{phase: {configuration: [seconds per step, one per window]}} for model ``name``."""
    import keras
    import tensorflow as tf

    from sr_tf import losses
    from sr_tf.data import pipeline
    from sr_tf.training import loop

    records = os.path.join(ROOT, "tfrecords", "samples")
    batch = next(iter(pipeline.make_dataset(records, "train", 4, args.patch_size, args.batch_size, seed=0)))
    steps = {"pixel": {}, "adversarial": {}}
    configs = dict(CONFIGS)
    if args.xla:
        configs[XLA] = CONFIGS["former"]
    built_all = {}
    strategy = tf.distribute.get_strategy()
    for label, options in configs.items():  # every build first: loop.build re-seeds (clears tf.function caches)
        if label == XLA:
            built_all[label] = built_all["former"]
            continue
        model_options = {key: value for key, value in options.items() if key not in LOSS_OPTIONS}
        config = loop.TrainConfig(model=name, scale=4, data=records, run_dir=os.devnull, batch_size=args.batch_size,
                                  patch_size=args.patch_size, strategy="default", progress=False,
                                  perceptual_weights="random", model_options=model_options,
                                  discriminator_options={"fused_batch_norm": options["fused_batch_norm"]},
                                  pretrain_steps=1, ema_decay=0.0, augment=False)  # the network's step alone
        with loop.global_policy(options.get(POLICY, "float32")):
            built_all[label] = built = loop.build(config, strategy)
        if not options[FOLDED]:
            folded = built["gan"].perceptual_loss
            built["gan"].perceptual_loss = unfolded = losses.PerceptualLoss(
                folded.backbone, weights=folded.weights_path, weight=folded.weight, fold_batch_norm=False)
            foldable = any(isinstance(layer, keras.layers.BatchNormalization) for layer in unfolded.extractor.layers)
        if options[JOINED]:
            built["gan"].perceptual_loss = JoinedPerceptualLoss(built["gan"].perceptual_loss)
    for label, built in built_all.items():
        for phase, trainer in (("pixel", built["supervised"]), ("adversarial", built["gan"])):
            if label == XLA and phase == "adversarial":
                continue  # compiling the perceptual backbone's step alone takes minutes
            if label in PIXEL_ONLY_SKIPS and phase == "pixel":
                continue
            if label == FOLDED_LABEL and not foldable:
                continue  # VGG19: nothing to fold, the former step again
            step = loop.distributed_step(strategy, trainer, jit_compile=label == XLA)
            steps[phase][label] = lambda step=step: float(step(batch)["loss"])
    seconds = {phase: {label: [] for label in calls} for phase, calls in steps.items()}
    for phase, calls in steps.items():
        for label, call in calls.items():
            started = time.perf_counter()
            call()
            call()
            print(f"  {name} {phase} {label}: warm-up {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        for window in range(args.windows):
            order = list(calls.items()) if window % 2 == 0 else list(calls.items())[::-1]
            for label, call in order:
                if label == XLA and window >= 2:
                    continue
                _, per_call = timed_window(call, args.batch_size, args.window_seconds, 2)
                seconds[phase][label].append(per_call)
                print(f"  {name} {phase} window {window + 1} {label}: {seconds[phase][label][-1] * 1e3:.0f} ms",
                      file=sys.stderr, flush=True)
    return seconds


def ratios(times, label):
    """Median over windows of (former time / ``label`` time) within each window."""
    pairs = list(zip(times["former"], times[label]))
    return statistics.median(a / b for a, b in pairs)


def srgan_pixel_gflop(batch, patch, filters=64, blocks=16, scale=4):
    """Convolution GFLOP of SRGAN's x4 pixel step (forward, input and weight gradients:
    three times the forward count; the head's input gradient is not needed, and is
    negligible anyway)."""
    lr = (patch // scale) ** 2 * batch
    body = (2 * blocks + 1) * lr * 9 * filters * filters
    head = lr * 81 * filters
    upsample = lr * 9 * filters * 4 * filters + 4 * lr * 9 * filters * 4 * filters
    tail = 4 * lr * 25 * 4 * filters  # 5x5 before the last shuffle, 4 outputs per pixel
    return 3 * 2 * (body + head + upsample + tail) / 1e9


def markdown(results, args, wall):
    from bench.report import machine
    from sr_tf import zoo

    cpu = zoo.machine()
    lines = [
        "## Training step of SRGAN and Swift-SRGAN: former step against each speed-up",
        "",
        f"`python -m bench.train_step` on {machine()} ({cpu['cpu']}; {', '.join(cpu['vector_extensions'])}), "
        f"TensorFlow {cpu['tensorflow']}; whole run {wall / 60:.1f} min. Global batch {args.batch_size}, HR patch "
        f"{args.patch_size}, x4, default strategy, one fixed batch; every configuration but `all, mixed_bfloat16` the same function. "
        f"Median ms per step over {args.windows} alternating windows of at least {args.window_seconds:g} s "
        "(XLA: 2 windows); speed-up = median of the within-window ratios former / configuration.",
        "",
        "| model | phase | configuration | ms per step | speed-up over former |",
        "|---|---|---|---:|---:|",
    ]
    summary = ["", f"| model | phase | speed-up of the default | {TARGET}x target | with mixed_bfloat16 |",
               "|---|---|---:|---|---:|"]
    for name, seconds in results.items():
        for phase, times in seconds.items():
            for label in (*CONFIGS, XLA):
                if label not in times or not times[label]:
                    continue
                ms = 1e3 * statistics.median(times[label])
                speed = "" if label == "former" else f"{ratios(times, label):.2f}x"
                shown = f"{label} (default)" if label == DEFAULT else label
                lines.append(f"| {name} | {phase} | {shown} | {ms:,.0f} | {speed} |")
            speedup = ratios(times, DEFAULT)
            bfloat16 = f"{ratios(times, BFLOAT16):.2f}x" if times.get(BFLOAT16) else ""
            summary.append(f"| {name} | {phase} | {speedup:.2f}x | {'met' if speedup >= TARGET else 'not met'} "
                           f"| {bfloat16} |")
    lines += summary
    srgan_gflop = srgan_pixel_gflop(args.batch_size, args.patch_size)
    default_ms = statistics.median(results["srgan"]["pixel"][DEFAULT]) if "srgan" in results else None
    srgan_rate = f"{srgan_gflop / default_ms:,.0f} GFLOP/s" if default_ms else "a rate not measured in this run"
    lines += [
        "",
        "What each candidate gave:",
        "",
        "- **Fused batch normalisation** (`blocks.FusedBatchNormalization`): Keras 3 trains batch "
        "normalisation with about ten separate ops; TensorFlow's fused kernel does it in one pass each "
        "way. The moving averages are updated exactly as Keras does (the kernel's Bessel-corrected "
        "variance is corrected back). 33 BN layers in each generator, 7 in each discriminator.",
        "- **Tail before the last pixel shuffle** (`SRResNet.rearranged_tail`): the 9x9 tail on 64 "
        "features at the output resolution becomes a 5x5 convolution on the grid before the shuffle, as a "
        "1x5 then a 5x1 convolution; the same rearrangement the TFLite export used, now the model's own "
        "form, so training, the Keras model and TFLite compute alike.",
        "- **Fused PReLU** (`blocks.FusedPReLU`): Keras writes PReLU as `relu(x) - a * relu(-x)`, five "
        "element-wise passes forward and about seven backward; a hand-written gradient does the same "
        "function in three and four. 19 PReLUs in each x4 generator; in the Keras model and TFLite the "
        "inference graph stays Keras' own (the converter's PRELU pattern). It gave nothing measurable here: the element-wise passes are a small share of a step next to the convolutions.",
        "- **Split perceptual loss** (`losses.PerceptualLoss`): the backbone ran once on targets and "
        "predictions joined and the targets' half was stopped after it, so the backward pass still ran "
        "through both halves (with a zero gradient for the targets); two calls run it through the "
        "predictions only. The backbone runs in inference mode, image by image: the same values. It "
        "matters for VGG19 (SRGAN), whose 16 convolutions up to `block5_conv4` are most of the "
        "adversarial step, and little for MobileNetV2 (Swift-SRGAN), which is light.",
        "- **Folded backbone batch normalisation** (`losses.fold_batch_norms`): the perceptual backbone "
        "is frozen and runs in inference mode, so each of MobileNetV2's 40 batch normalisations up to its tap "
        "is a per-channel affine map, folded into the convolution before it (kernel and bias rescaled once, "
        "when the loss is made): the same function, to float rounding, with one element-wise pass less per "
        "layer forward and backward. VGG19 has no batch normalisation, so SRGAN's step is unchanged by it.",
        "- **XLA** (`jit_compile=True`) on the former pixel step: slower on this CPU, far slower for "
        "Swift-SRGAN (its depthwise and convolution backward kernels are not the oneDNN ones), so it is "
        "not used.",
        "- **PSNR-first pre-training** (a change of the loss, so not in the table): a GAN's pixel-loss "
        "phase no longer computes its perceptual loss, which joins with the discriminator. Measured by "
        "this benchmark before that change, on the same machine, the former pixel step with its "
        "perceptual term took 317 ms (Swift-SRGAN, MobileNetV2) and 1,365 ms (SRGAN, VGG19).",
        "- **What is left of SRGAN's step is convolution arithmetic.** Its pixel step is 33 dense 3x3 "
        "convolutions of 64 channels on the LR grid and two sub-pixel convolutions of 64 to 256 "
        f"channels (the second on the 2x grid): {srgan_gflop / 3:.0f} GFLOP forward at batch "
        f"{args.batch_size} and HR {args.patch_size}, {srgan_gflop:.0f} forward and backward, which the "
        f"default step runs at {srgan_rate}, near what two cores can do in float32. Its adversarial step adds VGG19 to `block5_conv4` on 32 images of 96 x 96 "
        "(about 7 GFLOP each) and the backward pass through 16 of them. A profile of the default "
        "pixel step puts oneDNN's convolution kernels (forward, and backward for inputs and weights) "
        "at about 85 % of its op time. Running the input gradient as a forward convolution with the "
        "flipped kernel (measured alone: as fast as oneDNN's own backward kernel) and the 9x9 head as "
        "patches and a matrix product (3.5 times slower) gave nothing; what remains would change the "
        "numerics (bfloat16, below), which this target excludes.",
        "- **Winograd F(2x2, 3x3)** for the 3x3 convolutions (2.25 times fewer multiplications): written "
        "in TensorFlow ops (input and output transforms as strided slices and sums, or the input "
        "transform as a fixed 4x4 depthwise convolution, then 16 batched matrix products), the body "
        "convolution's forward and backward pass on a batch of 16 LR patches took 10 to 15 times as long "
        "as oneDNN's direct convolution: the transforms' many small ops cost far more than the arithmetic "
        "saved. Not used.",
        "- **bfloat16** (`train.py --precision=mixed_bfloat16`, the row `all, mixed_bfloat16`): the "
        "default step with its networks computing in bfloat16 (generator, discriminator and perceptual "
        "backbone; variables, the loss arithmetic and the model's output stay float32), on this CPU's "
        "AVX-512 BF16 instructions. It is not the same function to float32 rounding (8 bits of mantissa), "
        "so it is not counted for the target; what it costs in quality is measured by `bench.precision` "
        "(section \"precision\": the pixel-loss phase only). It pays only on a CPU with BF16 "
        "instructions (avx512_bf16, AMX) or a GPU, so it is never the default, and train.py warns when "
        "asked for it on a CPU without them.",
        "- Not tried further: NCHW layout (no CPU kernels for the pixel shuffle).",
    ]
    return "\n".join(lines)


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    started = time.perf_counter()
    results = {}
    for name in args.models:
        print(f"{name}: measuring", flush=True)
        results[name] = measure(name, args)
        for phase, times in results[name].items():
            print(f"{name} {phase}: " + ", ".join(
                f"{label} {1e3 * statistics.median(t):.0f} ms" for label, t in times.items() if t) +
                f"; default {ratios(times, DEFAULT):.2f}x the former", flush=True)
    text = markdown(results, args, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        from bench.report import update_section

        update_section("train_step", text)


if __name__ == "__main__":
    main()
