namespace Ddpm.Diffusion;

/// <summary>Settings that cannot be used: a flag's value out of its range, or a change that --resume cannot make. The message names the flag.</summary>
public sealed class UsageException(string message) : ArgumentException(message);

/// <summary>Training loss became NaN or infinite: the message names the step.</summary>
public sealed class TrainingDivergedException(string message) : Exception(message);
