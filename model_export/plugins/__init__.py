"""Plugin nodes for TensorRT: ``m2f export onnx --plugins``.

With plugins the exporter writes two custom-domain nodes in place of their standard-op decompositions:

- multi-scale deformable attention as TensorRT's built-in ``MultiscaleDeformableAttnPlugin_TRT`` (domain
  ``trt.plugins``), one node per pixel-decoder encoder layer. Its contract (TensorRT's
  ``plugin/multiscaleDeformableAttnPlugin``: README, ``getOutputDimensions``, ``supportsFormatCombination``):
  inputs ``value`` (N, S, M, D), ``spatial_shapes`` (L, 2) int32 as (H_l, W_l), ``level_start_index`` (L,)
  int32, ``sampling_locations`` (N, Lq, M, L, P, 2) as (x, y) in [0, 1], ``attention_weights``
  (N, Lq, M, L, P); output (N, Lq, M, D); float32 or float16 (all float tensors of one type); no
  attributes besides the ones the ONNX parser reads.
- masked attention as our own plugin ``MaskedAttention`` (domain ``m2f``), one node per decoder layer:
  ``q`` (B, H, Q, d), ``k`` and ``v`` (B, H, S, d), ``mask_logits`` (B, Q, S) shared by the heads; attribute
  ``scale`` (float); output (B, H, Q, d). ``softmax(q k^T * scale + M) v`` where a key is attended where its
  logit is >= 0 and a query whose row has no attended key attends everywhere (the fused Triton kernel's rule,
  :mod:`mask2former.masked_attention`).

TensorRT's ONNX parser imports a node it has no importer for as a plugin: it looks the plugin up by the
node's ``op_type`` as the plugin name, its ``plugin_version`` attribute (default "1") and its
``plugin_namespace`` attribute (default ""), then by the node's domain as the namespace. Both kinds of node
carry the two attributes explicitly. ``trt.plugins`` is also the domain ONNX Runtime's TensorRT execution
provider gives TensorRT's registered plugins.

Modules: :mod:`.shapes` (shape and type inference, pure Python, what a TensorRT plugin calls),
:mod:`.ops` (the PyTorch custom ops and their ONNX translations; imports torch) and :mod:`.ort_reference`
(the custom nodes on the CPU in ONNX Runtime through onnxruntime-extensions, for checking plugin graphs
without TensorRT). Importing this package imports neither torch nor onnx.
"""

from __future__ import annotations

MS_DEFORM_ATTN_DOMAIN = "trt.plugins"
MS_DEFORM_ATTN_OP = "MultiscaleDeformableAttnPlugin_TRT"
MS_DEFORM_ATTN_VERSION = "1"  # version 2 (IPluginV3, TensorRT >= 10.11) has the same inputs and attributes
MS_DEFORM_ATTN_NAMESPACE = ""  # TensorRT's own plugins live in the default namespace

MASKED_ATTENTION_DOMAIN = "m2f"
MASKED_ATTENTION_OP = "MaskedAttention"
MASKED_ATTENTION_VERSION = "1"
MASKED_ATTENTION_NAMESPACE = "m2f"

# The custom nodes a plugin graph may hold, as model_export.graph.op_types keys them ("domain::Op").
PLUGIN_OPS = (f"{MS_DEFORM_ATTN_DOMAIN}::{MS_DEFORM_ATTN_OP}", f"{MASKED_ATTENTION_DOMAIN}::{MASKED_ATTENTION_OP}")
PLUGIN_DOMAINS = (MS_DEFORM_ATTN_DOMAIN, MASKED_ATTENTION_DOMAIN)
