"""lm-evaluation-harness's command line with the `loopmdm` model registered.

lm-eval 0.4 finds a model only if its module was imported before the command line runs (there is
no plugin discovery), so this entry point imports the adapter and hands over to lm-eval:

    loopmdm-lm-eval --model loopmdm --model_args pretrained=HF_DIR,num_loops=4 --tasks ...
    python -m megatron_loopmdm.evaluation.lm_eval_cli --model loopmdm ...   (the same)

Every lm-eval flag works as documented by lm-eval.
"""

import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("loopmdm-lm-eval needs lm-evaluation-harness: pip install -e '.[eval]'")
    import megatron_loopmdm.evaluation.lm_eval_adapter  # noqa: F401  (registers "loopmdm")

    cli_evaluate()


if __name__ == "__main__":
    main()
