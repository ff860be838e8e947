"""Gaussian diffusion with learned variance (IDDPM) and SDAS, the strength-controlled sampler.

The forward process adds noise with a linear schedule of T = 1000 steps:
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   beta_t from 1e-4 to 0.02.
The network predicts the noise eps and a vector v that interpolates the reverse variance
between its two natural bounds in log space (IDDPM "learned range", RealNet eq. S1):
    log Sigma_theta = frac log beta_t + (1 - frac) log beta~_t,   frac = (v + 1) / 2,
    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)   (the posterior variance).
Training minimises L_simple + L_vlb, the VLB term with the mean detached so that it only
trains the variance (RealNet eq. S2; guided-diffusion's hybrid loss, docs/method.md).

SDAS (RealNet algorithm 1): at every reverse step but the last,
    x_{t-1} = mu_theta(x_t, t) + sqrt(1 + s) * Sigma_theta(x_t, t)^(1/2) * z,   z ~ N(0, I),
i.e. the learned variance inflated by (1 + s). s = 0 is ordinary sampling (normal images);
s in [0.1, 0.2] pushes the chain into the low-density region next to the normal images,
where anomalies live. Sampling uses 20 respaced steps (timesteps 0, 50, ..., 950).

All schedule arrays are float64 (as OpenAI's numpy arrays); values are taken per timestep
and cast to float32 when they meet the images.
"""

import math

import numpy as np
import torch

from .cli import UserError


# --------------------------------------------------------------------------- schedule
def linear_betas(num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """The DDPM linear schedule, scaled so that other T keep the same total noise."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def respaced_timesteps(num_timesteps, steps):
    """The original timesteps a `steps`-step sampler visits, ascending.

    The authors' "ddimN": the smallest stride i with len(range(0, T, i)) == N, so 20 of
    1000 gives 0, 50, ..., 950 (sampling starts at t = 950, not 999). Step counts that no
    stride gives (e.g. 600 of 1000) fall back to IDDPM's even spacing round(i (T-1)/(N-1)).
    """
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"--steps {steps}: must be between 1 and {num_timesteps}")
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == steps:
            return list(range(0, num_timesteps, stride))
    if steps == 1:
        return [0]
    frac = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * frac) for i in range(steps)})


def respaced_betas(betas, timesteps):
    """Betas of the shorter chain that visits `timesteps`: 1 - abar_{tau_k} / abar_{tau_{k-1}}."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    new_betas, last = [], 1.0
    for t in timesteps:
        new_betas.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.array(new_betas, dtype=np.float64)


# -------------------------------------------------------------------- losses' building blocks
def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of 8-bit images in [-1, 1] under a Gaussian integrated over each pixel's bin
    (width 2/255); the two end bins extend to -inf / +inf. Per element, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def randn_per_image(generators, shape, device):
    """One N(0, I) draw of `shape` per image from that image's own generator, stacked.

    Per-image generators make every image depend only on its own seed: the same image
    comes out whatever the batch size or the number of ranks.
    """
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


class GaussianDiffusion:
    """The diffusion over `len(betas)` steps; `timestep_map[k]` is the original timestep the
    model is shown at step k (identity for the full chain, 0, 50, ..., 950 for ddim20)."""

    def __init__(self, betas, timestep_map=None):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(
            timestep_map if timestep_map is not None else range(len(betas)), dtype=torch.long
        )
        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        acp_next = np.append(acp[1:], 0.0)
        posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        arrays = dict(
            betas=betas,
            log_betas=np.log(betas),
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            alphas_cumprod_next=acp_next,
            sqrt_alphas_cumprod=np.sqrt(acp),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1.0),
            posterior_variance=posterior_variance,
            # beta~_0 = 0: its log is replaced by the log of beta~_1 (the value is never
            # used as a variance at t = 0, where the decoder likelihood is used instead).
            posterior_log_variance_clipped=np.log(
                np.append(posterior_variance[1], posterior_variance[1:])
            ),
            posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
        )
        for name, value in arrays.items():
            setattr(self, name, torch.from_numpy(value))  # float64

    @classmethod
    def from_schedule(cls, schedule, steps=None):
        """`schedule` as stored in a checkpoint; `steps` respaces it (None: all T steps)."""
        if schedule.get("kind") != "linear":
            raise UserError(f"unknown noise schedule {schedule!r}")
        betas = linear_betas(
            schedule["num_timesteps"], schedule["beta_start"], schedule["beta_end"]
        )
        if steps is None or steps == len(betas):
            return cls(betas)
        timesteps = respaced_timesteps(len(betas), steps)
        return cls(respaced_betas(betas, timesteps), timestep_map=timesteps)

    def _at(self, name, t, x):
        """The schedule array `name` at per-image steps t (B,), shaped to broadcast over x."""
        value = getattr(self, name).to(t.device)[t].float()
        return value.view(-1, *([1] * (x.ndim - 1))).to(x.device)

    # ----------------------------------------------------------------------- forward process
    def q_sample(self, x0, t, noise):
        return (
            self._at("sqrt_alphas_cumprod", t, x0) * x0
            + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior(self, x0, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._at("posterior_mean_coef1", t, x_t) * x0
            + self._at("posterior_mean_coef2", t, x_t) * x_t
        )
        return mean, self._at("posterior_log_variance_clipped", t, x_t)

    # ----------------------------------------------------------------------- reverse process
    def model_output(self, model, x, t, y):
        """Run the network at step t; it sees the ORIGINAL timesteps (timestep_map). The
        output is used in float32 even when the network runs under bf16 autocast."""
        return model(x, self.timestep_map.to(t.device)[t], y).float()

    def mean_variance(self, output, x, t, clip_denoised=True):
        """(eps, v) -> mean, log-variance, predicted x_0 of p_theta(x_{t-1} | x_t)."""
        eps, v = output.split(x.shape[1], dim=1)
        min_log = self._at("posterior_log_variance_clipped", t, x)
        max_log = self._at("log_betas", t, x)
        frac = (v + 1) / 2  # v is not clamped (as in IDDPM)
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_x0 = (
            self._at("sqrt_recip_alphas_cumprod", t, x) * x
            - self._at("sqrt_recipm1_alphas_cumprod", t, x) * eps
        )
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_x0, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    def p_mean_variance(self, model, x, t, y, clip_denoised=True):
        return self.mean_variance(self.model_output(model, x, t, y), x, t, clip_denoised)

    # ----------------------------------------------------------------------- training
    def vb_terms_bpd(self, output, x0, x_t, t):
        """The VLB term of step t in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p_theta) for
        t > 0, the decoder's negative log-likelihood of x_0 at t = 0. (B,)"""
        true_mean, true_log_variance = self.q_posterior(x0, x_t, t)
        out = self.mean_variance(output, x_t, t, clip_denoised=False)
        kl = mean_flat(
            normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        ) / math.log(2.0)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        ) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0, t, y, noise=None):
        """Hybrid loss per image: ||eps - eps_theta||^2 (mean over dims) + VLB term with the
        predicted mean detached (so L_vlb trains only the variance; RealNet eq. S2).

        The VLB weight is 1 per sampled step, i.e. lambda = 1/T = 0.001 on the sum over all
        T steps in the paper's notation (docs/method.md, section 3)."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        output = self.model_output(model, x_t, t, y)
        eps, v = output.split(x0.shape[1], dim=1)
        mse = mean_flat((noise - eps) ** 2)
        vb = self.vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x0, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ----------------------------------------------------------------------- SDAS sampling
    @staticmethod
    def _per_image(value, x):
        value = torch.as_tensor(value, dtype=torch.float32, device=x.device)
        if value.ndim == 0:
            value = value.expand(x.shape[0])
        return value.view(-1, *([1] * (x.ndim - 1)))

    def p_sample(self, model, x, t, y, strength, z):
        """One SDAS step (algorithm 1):
        x_{t-1} = mu + 1[t != 0] sqrt(1 + s) exp(log Sigma / 2) z."""
        out = self.p_mean_variance(model, x, t, y, clip_denoised=True)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        s = self._per_image(strength, x)
        return out["mean"] + nonzero * torch.sqrt(1 + s) * torch.exp(
            0.5 * out["log_variance"]
        ) * z, out

    def ddim_sample(self, model, x, t, y, strength, z, eta=0.0):
        """One DDIM step (eta = 0: deterministic) with the SDAS perturbation of the appendix's
        algorithm S1 as the authors' code does it: an extra sqrt(s) Sigma_theta^(1/2) z on top
        of the eta-noise sigma_eta z, the same z (as the authors' ddim_sample)."""
        out = self.p_mean_variance(model, x, t, y, clip_denoised=True)
        eps = (self._at("sqrt_recip_alphas_cumprod", t, x) * x - out["pred_x0"]) / self._at(
            "sqrt_recipm1_alphas_cumprod", t, x
        )
        abar = self._at("alphas_cumprod", t, x)
        abar_prev = self._at("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_x0"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        s = self._per_image(strength, x)
        extra = torch.sqrt(s) * torch.exp(0.5 * out["log_variance"])
        return mean + nonzero * (sigma + extra) * z, out

    def ddim_reverse_sample(self, model, x, t, y):
        """Deterministic DDIM step x_t -> x_{t+1} (inversion of an image to its noise)."""
        out = self.p_mean_variance(model, x, t, y, clip_denoised=True)
        eps = (self._at("sqrt_recip_alphas_cumprod", t, x) * x - out["pred_x0"]) / self._at(
            "sqrt_recipm1_alphas_cumprod", t, x
        )
        abar_next = self._at("alphas_cumprod_next", t, x)
        return out["pred_x0"] * torch.sqrt(abar_next) + torch.sqrt(1 - abar_next) * eps

    @torch.no_grad()
    def sample(self, model, x_T, y, strength=0.0, sampler="ancestral", eta=0.0, generators=None):
        """Run the whole reverse chain from x_T: SDAS with per-image strength s (B,).

        sampler: "ancestral" (IDDPM, algorithm 1; the paper's choice) or "ddim" (algorithm S1).
        generators: one torch.Generator per image for the per-step noise z (None: global RNG).
        """
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}")
        x = x_T
        for k in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
            z = (
                torch.randn_like(x)
                if generators is None
                else randn_per_image(generators, x.shape[1:], x.device)
            )
            if sampler == "ancestral":
                x, _ = self.p_sample(model, x, t, y, strength, z)
            else:
                x, _ = self.ddim_sample(model, x, t, y, strength, z, eta=eta)
        return x

    @torch.no_grad()
    def ddim_invert(self, model, x0, y):
        """x_0 -> x_T along the deterministic DDIM path (the authors' training check: the DDIM
        reconstruction from the inverted noise should equal the input once the model is good)."""
        x = x0
        for k in range(self.num_timesteps):
            t = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
            x = self.ddim_reverse_sample(model, x, t, y)
        return x


def default_schedule(num_timesteps=1000):
    """The schedule entry a diffusion checkpoint stores (T = 1000, linear betas 1e-4 to 0.02)."""
    return {"kind": "linear", "num_timesteps": num_timesteps, "beta_start": 1e-4, "beta_end": 0.02}
