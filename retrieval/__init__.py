"""vtr: train, evaluate and time CLIP-based text-video retrievers side by side.

Importing the package registers vtr's tiny open_clip configs (``vtr-tiny``, ``vtr-micro``) so
that ``open_clip.create_model("vtr-tiny")`` and ``open_clip.get_tokenizer("vtr-tiny")`` work
everywhere, data code included.
"""

from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

__version__ = "0.1.0"
