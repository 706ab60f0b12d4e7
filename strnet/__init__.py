"""STR-Net: multi-task bone-loss screening from knee radiographs (framework-free science).

Nothing in this package imports Flower or MLflow: the federation (``client/``, ``server/``) and the
tracking layer wrap it, so every site runs exactly the code a centralized run does.
"""

__version__ = "0.1.0"
