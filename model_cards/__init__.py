"""Model card templates (Jinja, rendered by huggingface_hub's ModelCard) that ``ssl_path.hub export`` fills from records."""
