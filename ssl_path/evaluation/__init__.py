"""What every evaluation of an encoder shares, the frozen-feature probes and the fine-tuned heads alike.

- :mod:`.results`: the one ``results.json`` schema (with the task and title of what wrote it), the
  only thing the model card reads;
- :mod:`.metrics`: classification metrics and :data:`~.metrics.SCORES`, the score keys of a row
  (:data:`~.metrics.VARIANT_SCORES`: the anchors' variants beside them);
- :mod:`.stats`: mean, std and 95 % t interval over seeds;
- :mod:`.bootstrap`: 95 % bootstrap intervals over test tiles or whole slides, and paired
  differences between two encoders on the same redraws;
- :mod:`.splits`: train/test splits in whole groups, leave-one-domain-out folds;
- :mod:`.features`: row L2 normalisation of feature vectors.
"""
