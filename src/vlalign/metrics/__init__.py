"""Evaluation metrics as pure functions, shared by the ``eval/`` scripts and the training-time callbacks.

* ``pope``: SeVa's yes/no answer parsing and POPE's accuracy / precision / recall / F1 / yes-ratio;
* ``chair``: CHAIR's object matching (synonyms, plurals, longest phrase) and CHAIRs / CHAIRi / recall;
* ``reward``: reward accuracy, margins and a bootstrap interval over held-out preference pairs;
* ``amber``: AMBER's generative (CHAIR, Cover, Hal, Cog) and discriminative (yes/no per dimension) metrics.

``eval/pope.py``, ``eval/chair.py``, ``eval/reward_accuracy.py`` and ``eval/amber.py`` add files, tables and plots around them;
``vlalign.evaluation`` runs them on the live policy during training.
"""
