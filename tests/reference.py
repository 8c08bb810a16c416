"""A plain float64 reference of everything the kernels compute, written for clarity, not speed.

Independent of the package: nothing here imports bpkernels, so a mistake in the package cannot
be copied into its own test oracle. Every function takes and returns float64 NumPy arrays (inputs
are converted first), uses the textbook formula, and writes nothing in place except the
optimizer rules, which update a ``state`` dict exactly as torch.optim updates its own.
"""
from __future__ import annotations

import math

import numpy as np

LEAKY_RELU_SLOPE = 0.01


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------------- activations
# Each derivative takes the pre-activation z: the reference never relies on the "derivative
# from the output" shortcut that the kernels use, so the two are genuinely different routes.

def log_sigmoid(z):
    # log(1 / (1 + exp(-z))) = -log(1 + exp(-z)); logaddexp keeps it finite for any z.
    return -np.logaddexp(0.0, -f64(z))


def sigmoid(z):
    return np.exp(log_sigmoid(z))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def normal_cdf(z):
    return 0.5 * (1.0 + _erf(f64(z) / math.sqrt(2.0)))


def normal_pdf(z):
    z = f64(z)
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def activation(name: str, z):
    z = f64(z)
    if name == "identity":
        return z.copy()
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, LEAKY_RELU_SLOPE * z)
    if name == "sigmoid":
        return sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "gelu":
        return z * normal_cdf(z)  # the exact (erf) form, as torch.nn.GELU()
    if name == "silu":
        return z * sigmoid(z)  # torch.nn.SiLU()
    raise ValueError(name)


def activation_derivative(name: str, z):
    """act'(z); at z == 0 the ReLU family takes torch's choice: relu' = 0, leaky' = slope."""
    z = f64(z)
    if name == "identity":
        return np.ones_like(z)
    if name == "relu":
        return np.where(z > 0, 1.0, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, LEAKY_RELU_SLOPE)
    if name == "sigmoid":
        s = sigmoid(z)
        return s * (1.0 - s)
    if name == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if name == "gelu":
        return normal_cdf(z) + z * normal_pdf(z)
    if name == "silu":  # product rule: s(z) + z s'(z), s' = s (1 - s)
        s = sigmoid(z)
        return s + z * s * (1.0 - s)
    raise ValueError(name)


# ---------------------------------------------------------------------- dense layer

def dense_forward(X, W, b, act: str):
    """Returns (Z, A) with Z = X @ W + b and A = act(Z)."""
    Z = f64(X) @ f64(W) + f64(b)
    return Z, activation(act, Z)


def dense_backward(X, W, Z, dA, act: str):
    """Returns (dZ, dW, db, dX) from the gradient dA of the layer's output."""
    dZ = f64(dA) * activation_derivative(act, Z)
    return dZ, f64(X).T @ dZ, dZ.sum(axis=0), dZ @ f64(W).T


# ---------------------------------------------------------------------- losses
# PyTorch conventions; each returns (mean loss, d(mean loss)/dY).

def one_hot(labels, n_classes: int) -> np.ndarray:
    T = np.zeros((len(labels), n_classes))
    T[np.arange(len(labels)), np.asarray(labels)] = 1.0
    return T


def log_softmax(Y):
    Y = f64(Y)
    shifted = Y - Y.max(axis=1, keepdims=True)  # max-subtraction keeps exp finite
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def mse(Y, T):
    """mean over all elements of (y - t)^2."""
    Y, T = f64(Y), f64(T)
    diff = Y - T
    return np.mean(diff ** 2), 2.0 * diff / Y.size


def cross_entropy(Y, T):
    """Logits Y (n, o); T int labels (n,) or probability rows (n, o).
    loss_i = -sum_j t_ij log_softmax(y)_ij, mean over the n rows."""
    Y = f64(Y)
    n, o = Y.shape
    T = np.asarray(T)
    T = one_hot(T, o) if T.ndim == 1 else f64(T)
    logp = log_softmax(Y)
    loss = -(T * logp).sum() / n
    # d/dy_ij of -sum_k t_ik log_softmax_ik = softmax_ij * sum_k t_ik - t_ij
    grad = (np.exp(logp) * T.sum(axis=1, keepdims=True) - T) / n
    return loss, grad


def binary_cross_entropy(Y, T):
    """Logits Y, targets T in [0, 1], both (n, o); mean over all elements of
    -(t log sigmoid(y) + (1 - t) log(1 - sigmoid(y)))."""
    Y, T = f64(Y), f64(T)
    per_element = -(T * log_sigmoid(Y) + (1.0 - T) * log_sigmoid(-Y))
    return per_element.mean(), (sigmoid(Y) - T) / Y.size


LOSSES = {"mse": mse, "cross_entropy": cross_entropy, "binary_cross_entropy": binary_cross_entropy}


def loss(kind: str, Y, T):
    return LOSSES[kind](Y, T)


def count_correct(Y, labels) -> int:
    Y, labels = f64(Y), np.asarray(labels)
    if Y.shape[1] == 1:
        return int(np.sum((Y[:, 0] > 0) == (labels.reshape(-1) >= 0.5)))
    if labels.ndim == 2:
        labels = labels.argmax(axis=1)
    return int(np.sum(Y.argmax(axis=1) == labels))


# ---------------------------------------------------------------------- MLP

def mlp_forward(weights, X, activations):
    """weights: [(W, b), ...]; activations: one name per layer (the last is usually identity).
    Returns the list of (Z, A) per layer."""
    layers, A = [], f64(X)
    for (W, b), act in zip(weights, activations):
        Z, A = dense_forward(A, W, b, act)
        layers.append((Z, A))
    return layers


def mlp_loss_and_grads(weights, X, T, activations, loss_kind: str):
    """Mean loss and [(dW, db), ...] of an MLP, by plain backpropagation."""
    layers = mlp_forward(weights, X, activations)
    value, dA = loss(loss_kind, layers[-1][1], T)
    grads = [None] * len(weights)
    for i in reversed(range(len(weights))):
        X_in = f64(X) if i == 0 else layers[i - 1][1]
        _, dW, db, dA = dense_backward(X_in, weights[i][0], layers[i][0], dA, activations[i])
        grads[i] = (dW, db)
    return value, grads


# ---------------------------------------------------------------------- optimizers
# torch.optim's single-tensor update rules, step by step. ``state`` holds "step" (the number
# of updates done so far) and the buffers, created on first use as torch does. Each function
# returns the new parameters and updates ``state`` in place.

def sgd(p, g, state, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    p, g = f64(p).copy(), f64(g)
    state["step"] = state.get("step", 0) + 1
    if weight_decay != 0:
        g = g + weight_decay * p  # L2: decay is added to the gradient, before momentum
    if momentum != 0:
        if "momentum_buffer" not in state:
            buf = g.copy()  # first step: the buffer is the gradient, no dampening
        else:
            buf = momentum * state["momentum_buffer"] + (1.0 - dampening) * g
        state["momentum_buffer"] = buf
        g = g + momentum * buf if nesterov else buf
    return p - lr * g


def adam(p, g, state, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
    """torch.optim.Adam (decoupled=False) and torch.optim.AdamW (decoupled=True)."""
    p, g = f64(p).copy(), f64(g)
    state["step"] = t = state.get("step", 0) + 1
    if weight_decay != 0:
        if decoupled:
            p = p * (1.0 - lr * weight_decay)  # AdamW: decay the weights themselves
        else:
            g = g + weight_decay * p
    m = beta1 * state.get("exp_avg", np.zeros_like(p)) + (1.0 - beta1) * g
    v = beta2 * state.get("exp_avg_sq", np.zeros_like(p)) + (1.0 - beta2) * g * g
    state["exp_avg"], state["exp_avg_sq"] = m, v
    m_hat = m / (1.0 - beta1 ** t)
    # torch adds eps to sqrt(v_hat), not inside the square root
    denom = np.sqrt(v) / math.sqrt(1.0 - beta2 ** t) + eps
    return p - lr * m_hat / denom


def rmsprop(p, g, state, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False):
    p, g = f64(p).copy(), f64(g)
    state["step"] = state.get("step", 0) + 1
    if weight_decay != 0:
        g = g + weight_decay * p
    square_avg = alpha * state.get("square_avg", np.zeros_like(p)) + (1.0 - alpha) * g * g
    state["square_avg"] = square_avg
    if centered:
        grad_avg = alpha * state.get("grad_avg", np.zeros_like(p)) + (1.0 - alpha) * g
        state["grad_avg"] = grad_avg
        avg = np.sqrt(square_avg - grad_avg ** 2) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum > 0:
        buf = momentum * state.get("momentum_buffer", np.zeros_like(p)) + g / avg
        state["momentum_buffer"] = buf
        return p - lr * buf
    return p - lr * g / avg


# ----------------------------------------------------------------------- GEMM test operands
GEMM_SHAPES = [(5, 7, 3), (1, 4, 1), (3, 1, 2), (33, 65, 17)]  # (m, k, n), edge sizes included


def padded(M, pad):
    """M as the first columns of a wider C-ordered array (rows ``pad`` elements apart beyond
    its own width): to Numba, an array of layout 'A', not 'C'."""
    if not pad:
        return M
    wide = np.full((M.shape[0], M.shape[1] + pad), np.nan, M.dtype)
    wide[:, :M.shape[1]] = M
    return wide[:, :M.shape[1]]


def torch_mlp(weights, hidden: str):
    """PyTorch's float64 twin of a network with ``weights`` [(W, b), ...] (W of shape (in, out),
    as bpkernels stores it) and activation ``hidden`` ("tanh" or "relu") between the layers:
    the tests' reference for training. torch is imported here only, as a test-only dependency."""
    import torch
    layers = []
    for i, (W, b) in enumerate(weights):
        lin = torch.nn.Linear(*W.shape, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(np.asarray(W, dtype=np.float64).T))
            lin.bias.copy_(torch.tensor(np.asarray(b, dtype=np.float64)))
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append({"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[hidden]())
    return torch.nn.Sequential(*layers)


def torch_mlp_weights(net) -> list[tuple[np.ndarray, np.ndarray]]:
    """The [(W, b), ...] of a :func:`torch_mlp` network, W of shape (in, out)."""
    return [(lin.weight.detach().numpy().T, lin.bias.detach().numpy())
            for lin in net if hasattr(lin, "weight")]
