"""Evaluation, in one place: from a model's outputs to the scores, the files and the pictures.

    inference.py        image -> logits: the whole image or sliding windows, scales, flip
    loop.py             the one evaluation loop: predictions past a list of accumulators
    metrics.py          the confusion matrix and instance statistics (accumulators)
    scores.py           the table of scores computed from them (mIoU, iIoU, ... one function
                        each)
    shards.py           scoring a split's shards through the loader (validation, --data)
    full_resolution.py  scoring the original PNGs (--datadir), predictions made elsewhere
    submission.py       the benchmark server's zip (--submit)
    results.py          metrics.json, the terminal summary, the results folder
    pictures.py         confusion.png, iou.png
    evaluate.py         `citytrain evaluate`, and the evaluation that ends `citytrain fit`
"""
