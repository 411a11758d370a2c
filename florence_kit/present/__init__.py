"""Stage 6, present: what a user looks at or ships: ``report`` (report.html), ``serve`` (the local web
page), ``draw`` (regions on images), ``hub`` (push a run), ``export`` (a merged model), ``onnx_export``
(ONNX graphs for onnxruntime and Transformers.js).
"""
