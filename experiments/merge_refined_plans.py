"""A router whose plans at some budgets come from another refinement of its order (``CacheRouter.with_refined_plans``).

A refinement (``search.order_from``, e.g. under ``search.error: log_mse``) may help at some budgets and hurt at
others on held-out seeds; this keeps only the budgets it helped. The shipped router was made so (docs/router.md):

    python experiments/merge_refined_plans.py --base dit_cache/assets/embedded_router.safetensors \\
        --source runs/router/refine16_log_mse/router.safetensors --shares [0.65,0.7] \\
        --output dit_cache/assets/embedded_router.safetensors
"""

from pathlib import Path

from jsonargparse import CLI

from dit_cache import CacheRouter


def main(base: str = "dit_cache/assets/embedded_router.safetensors",
         source: str = "runs/router/refine16_log_mse/router.safetensors", shares: list[float] = [0.65, 0.7],
         output: str = "outputs/merged_router.safetensors") -> None:
    """Args:
        base: the router to start from.
        source: a router searched with ``search.order_from`` set to ``base`` (the same order).
        shares: the FLOP shares (budgets) whose refined plans are taken from ``source``.
        output: where the merged router is saved (may be ``base``).
    """
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    merged = CacheRouter.load(base).with_refined_plans(CacheRouter.load(source), shares)
    merged.save(output)
    print(f"{output}: refined plans at {[round(s, 4) for s in merged.refined_shares]} "
          f"({[round(s, 4) for s in shares]} from {source})")


if __name__ == "__main__":
    CLI(main)
