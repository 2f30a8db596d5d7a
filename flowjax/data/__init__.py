"""Prompt sets (files, generators, TFDS builders), the shapes scenes and the k-repeat group sampler.

Nothing here imports a reward or a model: the worlds (`flowjax.worlds`) join prompts to them."""
