"""Test-wide settings: nothing may reach the network while tests run."""

import os

# Set before anything imports huggingface_hub, which reads it once: a hub lookup fails at once
# instead of retrying for a minute against a closed network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
