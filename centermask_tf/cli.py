"""The `centermask` command line: thin sub-commands over the library.

    centermask info --config configs/coco_resnet18.yaml [--set model.input_size=256]
"""

import argparse
import os
import sys

# TensorFlow's C++ start-up logging drowns the useful output of a CLI.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _add_config_args(parser):
    parser.add_argument("--config", required=True, help="YAML config file (see configs/).")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.backbone=resnet50 (repeatable)",
    )


def _load(args):
    from centermask_tf.config import load_config

    return load_config(args.config, args.overrides)


def cmd_info(args):
    """Prints parameter count and FLOPs of the network built from each config."""
    from centermask_tf.model.centermask import build_model
    from centermask_tf.profiling import model_flops

    rows = []
    for path in args.config:
        args_one = argparse.Namespace(config=path, overrides=args.overrides)
        config = _load(args_one)
        if args.no_weights:
            config.model.weights = None
        model = build_model(config)
        rows.append(
            (
                os.path.basename(path),
                config.model.backbone,
                config.model.input_size,
                model.count_params() / 1e6,
                model_flops(model) / 1e9,
            )
        )
    print(f"{'config':<26}{'backbone':<20}{'input':>6}{'params (M)':>12}{'GFLOPs':>10}")
    for name, backbone, size, params, flops in rows:
        print(f"{name:<26}{backbone:<20}{size:>6}{params:>12.2f}{flops:>10.2f}")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="centermask", description="CenterMask instance segmentation (TensorFlow/Keras)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameters and FLOPs of configs' networks")
    info.add_argument("--config", nargs="+", required=True, help="one or more YAML configs")
    info.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    info.add_argument(
        "--no-weights",
        action="store_true",
        help="build with model.weights=null (no ImageNet download needed; same cost)",
    )
    info.set_defaults(handler=cmd_info)
    return parser


def main(argv=None):
    from centermask_tf.config import ConfigError
    from centermask_tf.model.backbones import BackboneWeightsError

    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ConfigError, BackboneWeightsError) as e:
        print(f"centermask {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
