"""Publishing an encoder: timm-format export (:mod:`.export`), its model card made from records
(:mod:`.card`, :mod:`.records`), and the upload to the Hub (:mod:`.push`)."""
