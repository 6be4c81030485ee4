"""A study on Ray Tune: search-space files (``space``), what a design can decide (``plan``), the driver and its
protocol (``driver``), searchers and schedulers (``search``), the trainable, the study folder's format
(``folder``) and reader (``results``), storage, tracking, progress.
"""
