"""The model zoo: list the shipped models, reproduce one, or build them all.

    python zoo.py                               # the zoo: names, what each is, built or not
    python zoo.py --build=swift_srgan_x4        # train it on the sample set, evaluate, publish
    python zoo.py --build=all                   # every model, in order (the GAN after its base)
    python zoo.py --package=swift_srgan_x4      # publish again from its finished run (runs/zoo/<name>)

Each model trains on the embedded sample set with the command in its recipe
(``sr_tf.zoo.RECIPES``), is exported to float16 TFLite, evaluated on the development
held-out set, and published in saved_models/<name>/ with its model card.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("build", [], "Zoo models to build (comma-separated), or all.")
flags.DEFINE_list("package", [], "Zoo models to publish again from their finished runs in runs/zoo/, or all.")


def listing():
    from sr_tf import zoo

    lines = []
    for name, recipe in zoo.RECIPES.items():
        try:
            card = zoo.card(name)
            pooled = card["evaluation"]["summary"]["all"]
            model, bicubic = pooled["model"], pooled["bicubic"]
            state = (f"PSNR {model['psnr']:.2f} dB ({model['psnr'] - bicubic['psnr']:+.2f} vs bicubic), "
                     f"SSIM {model['ssim']:.4f} on the development set")
        except (zoo.ZooError, OSError, KeyError, ValueError):
            state = "not built"
        lines.append(f"{name:30s} {recipe.kind:10s} {recipe.description}\n{'':41s} {state}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sr_tf import zoo

    if not FLAGS.build and not FLAGS.package:
        print(listing())
        return 0
    chosen = FLAGS.build or FLAGS.package
    make = zoo.build if FLAGS.build else zoo.package
    wanted = list(zoo.RECIPES) if chosen == ["all"] else chosen
    unknown = [name for name in wanted if name not in zoo.RECIPES]
    if unknown:
        print(f"error: unknown zoo model(s) {', '.join(unknown)}; known: {', '.join(zoo.RECIPES)}", file=sys.stderr)
        return 1
    for name in wanted:
        try:
            card = make(name)
        except (zoo.ZooError, OSError, ValueError) as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # a failed training subprocess
            print(f"error: {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        pooled = card["evaluation"]["summary"]["all"]
        print(f"{name}: PSNR {pooled['model']['psnr']:.2f} dB, bicubic {pooled['bicubic']['psnr']:.2f} dB, "
              f"lanczos {pooled['lanczos']['psnr']:.2f} dB on the development set")
    return 0


if __name__ == "__main__":
    app.run(main)
