"""Data handling shared by the stages: source images and the manifest (`images`); the training side's uint8
cache (`cache`), augmentation (`transforms`), loaders (`loader`) and each epoch's batches (`epochs`)."""
