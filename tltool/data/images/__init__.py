"""Image data: a folder per class, a CSV of paths and labels, or a built-in image set.

Images are decoded and resized ONCE, at load time, to a square `size` and kept as uint8 tensors;
a network's float input is prepared from them batch by batch. Where each step lives:

- `sources`: where images and labels come from (kind image_folder, kind image_csv, built-in
  sets), each yielding a `SourceImages`;
- `decoding`: PIL decoding, the decode-once step with its cache, lazy decoding (`LazyImages`),
  uint8 resizing, and `load_image_files` for new images to predict;
- `dataset`: `load_images` (source -> checked, split `ImageData`), `is_image_config`;
- `prepare`: `make_prepare`, the uint8 -> normalised float step with augmentation.
"""
