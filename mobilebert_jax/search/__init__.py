"""Architecture search: NAS-BERT block-wise supernet, layer-mapping GA (see the submodules)."""
