"""The diffusion process: the VP-SDE and its time grids (`sde`), the conversions between the ε,
x̂₀, score and v parameterisations and the network bindings (`score`), the training losses
(`losses`), and Gaussian mixtures whose scores are exact (`gmm`)."""
