from datasets.download import MVTEC_CATEGORIES, ensure_category
from datasets.mvtec import MVTecCategory, find_categories

__all__ = ["MVTEC_CATEGORIES", "ensure_category", "MVTecCategory", "find_categories"]
