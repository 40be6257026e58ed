"""defectforge: a data factory for synthetic industrial defect images."""

__version__ = "0.1.0"
