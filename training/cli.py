"""``dit-cache-train``: the Lightning CLI for cache routers.

    dit-cache-train fit --config training/configs/embedded.yaml
    dit-cache-train fit --config training/configs/pixart_alpha_256.yaml --trainer.devices 4
"""

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from .data import RouterDataModule
from .router_module import RouterModule


class RouterCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # The data module encodes prompts with the same model the router is trained for.
        parser.link_arguments("model.model", "data.model")

    def instantiate_classes(self):
        # Bad settings (num_steps 0, a missing prompt file, ...) are refused when the classes are built: one
        # readable line, as for a bad flag, rather than a traceback through jsonargparse.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:
            print(f"dit-cache-train: error: {error}", file=sys.stderr)
            sys.exit(2)


def main(args=None):
    # Both describe what router training does on purpose: the frozen transformer stays in eval mode, and a
    # checkpoint holds the router after its last optimizer step (what a resumed run continues from).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    RouterCLI(RouterModule, RouterDataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
