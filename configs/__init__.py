"""YAML presets and the typed loader (``load_config``) shared by centralized and federated runs."""

from configs.schema import Config, config_from_dict, load_config

__all__ = ["Config", "config_from_dict", "load_config"]
