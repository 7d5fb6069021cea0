"""The one home of every hyperparameter default that more than one part of the API shares.

The constructors (:class:`~bgf_pyg.losses.BatchGraphLoss`, :class:`~bgf_pyg.nn.BGFormer`,
:class:`~bgf_pyg.models.BGFormerMethod`, ...), :func:`~bgf_pyg.graph.build_batch_graph` and the
experiment configuration (:class:`~bgf_pyg.config.Config`) all take their defaults from here, so a
parameter of the same name means the same default everywhere (``tests/test_config.py`` checks
every signature). The values and where they come from: ``docs/design.rst`` §7 (BGFormer), §8
(PCE), §9 (intra-batch), §10 (ProxyGML) and §16 (the configuration).
"""

#: Visual neighbours of each sample: the kNN graph's k, or the dynamic top-K attention's K (the
#: BGFormer authors' CUB, Cars and SOP runs).
K = 30
#: BGFormer's weight α of the loss on the backbone features; 1 − α weighs the refined tokens'
#: (the authors' CUB and In-Shop value).
ALPHA = 0.01
#: Dual SSA's weight λ of the visual branch; 1 − λ weighs the semantic one (the authors' own
#: value is unpublished; their runs use 0.1–0.7).
LAM = 0.5
#: Logit temperature of the intra-batch cross-entropy and of the pairwise cross-entropy (PCE).
TEMPERATURE = 0.2
#: ProxyGML's proxies per class N, its top-k fraction r and its regulariser weight λ.
PROXIES_PER_CLASS = 12
PROXYGML_R = 0.05
PROXYGML_LAMBDA = 0.3
