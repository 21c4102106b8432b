"""sidrec: an HSTU recommender with Semantic IDs, trained offline and served online."""

__version__ = "0.1.0"
