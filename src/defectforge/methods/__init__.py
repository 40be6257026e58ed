"""Generation methods. Importing this package registers every built-in method."""

from defectforge.methods.base import GenerationMethod, GenerationResult, MethodConfig, get_method_class, registered_methods
from defectforge.methods import copy_paste  # noqa: F401  (registers "copy-paste")

__all__ = ["GenerationMethod", "GenerationResult", "MethodConfig", "get_method_class", "registered_methods"]
