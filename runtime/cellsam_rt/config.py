"""Names shared by every layer: the graphs of a model directory, precisions, backends and tile
modes. Defined once here; modules and the command line import them."""

#: the three graphs of a model directory, in pipeline order
GRAPH_NAMES = ("encoder", "cellfinder", "decoder")
#: graphs a model directory may add: the windowed (RoI) mask decoder, used where the manifest's
#: "decoder_window" policy allows it
OPTIONAL_GRAPHS = ("decoder_window",)
#: graph precisions; int8 = dynamically quantised trunks written by `cellsam-rt quantize` (CPU)
PRECISIONS = ("fp32", "fp16", "int8")
#: precisions a TensorRT engine is built in
ENGINE_PRECISIONS = ("fp16", "fp32")
#: backends accepted by `create_backend` and --backend
BACKENDS = ("cpu", "cuda", "tensorrt-ep", "tensorrt")
#: --tile: auto decides from the image and cell size, never/always force it
TILE_MODES = ("auto", "never", "always")
#: --decoder: auto = the windowed decoder for boxes it fits where the model has one; full = never
DECODER_MODES = ("auto", "full")
#: --polarity: auto inverts an image whose objects are darker than its background where the
#: detector agrees; bright keeps every image as it is; dark inverts every image
POLARITIES = ("auto", "bright", "dark")
#: --outline: model keeps the mask decoder's outlines; contrast redraws each mask's edge in the
#: image and drops faint objects (single-channel images), keeps each mask in one piece and
#: drops fragments (masks far from convex or far smaller than the image's others);
#: auto = what the model directory states (model if nothing)
OUTLINES = ("auto", "model", "contrast")
#: --denoise: off reads every image as given; gaussian smooths an image whose intensity span is
#: only a few noise standard deviations before the model reads it (stages/denoise.py);
#: auto = what the model directory states (off if nothing)
DENOISE_MODES = ("auto", "off", "gaussian")
#: --augment: off segments the image once; flips segments it as given and in three mirrored
#: views and keeps the objects two of the four find (pipeline/augment.py), four segmentations
#: per image; auto = what the model directory states (off if nothing)
AUGMENT_MODES = ("auto", "off", "flips")
