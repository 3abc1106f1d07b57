"""Networks and diffusion math. Plain arguments in; no jobs, specs, ranks or tracking."""
