"""nnU-Net v2 as a baseline row: its dataset, our split, one trial (``run``) and its trainer subclass
(``trainer``, imported only inside a trial).
"""
