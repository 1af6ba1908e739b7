using System.Globalization;

namespace Ddpm.Diffusion;

/// <summary>Numbers as a person writes them in the program's lines and plots: at most four significant digits, no
/// float noise (1e-4, not 0.000100000005), plain decimals from 0.001 to 10,000, a power of ten outside them.</summary>
public static class Numbers
{
    /// <summary>"0.9995", "0.002", "1e-4", "12", "2.5e+6".</summary>
    public static string Human(double value)
    {
        if (value == 0 || double.IsNaN(value) || double.IsInfinity(value))
        {
            return value.ToString(CultureInfo.InvariantCulture);
        }
        // Rounded to four significant digits first: a float's 0.000100000005 is 1e-4.
        double rounded = double.Parse(value.ToString("G4", CultureInfo.InvariantCulture), CultureInfo.InvariantCulture);
        double size = Math.Abs(rounded);
        if (size >= 1e-3 && size < 1e4)
        {
            return rounded.ToString("0.####", CultureInfo.InvariantCulture);
        }
        string e = rounded.ToString("0.###e+0", CultureInfo.InvariantCulture);
        return e.Replace("e+", size >= 1 ? "e+" : "e", StringComparison.Ordinal);
    }

    /// <summary><see cref="Human(double)"/> of a float, read as the decimal it was written as (1e-4f, not 1.00000005e-4).</summary>
    public static string Human(float value) => Human(double.Parse(value.ToString("R", CultureInfo.InvariantCulture), CultureInfo.InvariantCulture));
}
