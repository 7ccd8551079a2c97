"""`hetero compare`: one batch through hetero and through transformers, side by side,
layer by layer, so that a loss curve that looks wrong on a new chip can be traced to
the first layer where the numbers part (hetero.compare.trace records, .diff compares)."""
