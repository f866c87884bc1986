"""What lives on disk: model bundles (manifest, weights, artifacts) and labelled data files."""
