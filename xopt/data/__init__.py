"""Bundled public-domain text (Jane Austen), disjoint by construction:

- calibration.txt: the opening chapters of *Emma* (about 40 kB), for passes that calibrate;
- evaluation.txt: the opening chapters of *Persuasion* (about 31 kB), for `xopt eval`.
"""
