"""What a run will hold, decided before any rank waits on another: from the config, the model's
config.json and the checkpoint's safetensors headers alone (never a weight).

    model.py         the model as planning sees it (skeleton on meta, sizes, saved dtype)
    checkpoint.py    safetensors headers; the checkpoint checked against the model
    partition.py     the layer split, the device_map, Rank (the rank facts)
    quantization.py  which weights are quantized and how many bytes they hold
    layout.py        each rank's bytes for one split (RankPlan, Plan)
    offload.py       which layers stream, from host memory or disk
    fit.py           the smallest pipeline and largest batch that fit
    make.py          make_plan(): all of it, checked against the budgets
    __main__.py      python -m pipeinfer.plan: the dry run
"""
