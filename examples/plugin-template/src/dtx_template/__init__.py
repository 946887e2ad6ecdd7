"""dtx-backbone-template: a third-party dtx backbone to copy. Kept empty so that importing the plugin module (which
``dtx plugins`` does for every installed plugin) loads no model code."""

__version__ = "0.1.0"
