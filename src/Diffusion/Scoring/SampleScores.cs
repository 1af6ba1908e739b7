using MathNet.Numerics.LinearAlgebra;

namespace Ddpm.Diffusion;

/// <summary>
/// The scores of a set of digits by the classifier:
///   mean confidence   (1/N) Σ_i max_k p_ik
///   confident share   |{i : max_k p_ik &gt; 0.9}| / N
///   histogram         h_k = |{i : argmax p_i = k}|, and its KL divergence to uniform KL = Σ_k q_k log(K q_k), q = h/N
///   Fréchet distance  of the penultimate features against a reference set (see <see cref="FrechetDistance"/>)
/// </summary>
public sealed record SampleScores(int Count, double MeanConfidence, double ConfidentShare, int[] Histogram, double ClassKl, double Frechet)
{
    /// <summary>The confidence above which a digit counts as confidently classified.</summary>
    public const double ConfidentAbove = 0.9;

    /// <summary>Scores <paramref name="count"/> digits from their class probabilities [count, K] and features [count, d]
    /// against reference features [refCount, d].</summary>
    public static SampleScores Of(float[] probabilities, float[] features, int count, int classes, float[] referenceFeatures, int referenceCount)
    {
        if (count < 2 || referenceCount < 2)
        {
            throw new ArgumentException($"scores need at least 2 digits and 2 reference digits (got {count} and {referenceCount})");
        }
        var histogram = new int[classes];
        double confidence = 0;
        int confident = 0;
        for (int i = 0; i < count; i++)
        {
            var p = probabilities.AsSpan(i * classes, classes);
            int top = Classifier.ArgMax(p);
            histogram[top]++;
            confidence += p[top];
            if (p[top] > ConfidentAbove)
            {
                confident++;
            }
        }
        int d = features.Length / count;
        return new SampleScores(count, confidence / count, (double)confident / count, histogram, KlToUniform(histogram),
            FrechetDistance(features, count, referenceFeatures, referenceCount, d));
    }

    /// <summary>
    /// For samples drawn with a class asked of a conditional model: the share whose most probable class is the one asked,
    /// |{i : argmax p_i = asked_i}| / N, overall and for each class asked (classes never asked are left out).
    /// </summary>
    public static (double Overall, SortedDictionary<int, double> ByClass) AskedShare(float[] probabilities, IReadOnlyList<int> asked, int classes)
    {
        if (asked.Count == 0 || probabilities.Length != asked.Count * classes)
        {
            throw new ArgumentException($"asked share: {probabilities.Length} probabilities are not {asked.Count} rows of {classes} (need at least one)");
        }
        var right = new SortedDictionary<int, int>();
        var total = new SortedDictionary<int, int>();
        int hits = 0;
        for (int i = 0; i < asked.Count; i++)
        {
            bool hit = Classifier.ArgMax(probabilities.AsSpan(i * classes, classes)) == asked[i];
            hits += hit ? 1 : 0;
            right[asked[i]] = right.GetValueOrDefault(asked[i]) + (hit ? 1 : 0);
            total[asked[i]] = total.GetValueOrDefault(asked[i]) + 1;
        }
        var byClass = new SortedDictionary<int, double>();
        foreach (var (k, n) in total)
        {
            byClass[k] = (double)right[k] / n;
        }
        return ((double)hits / asked.Count, byClass);
    }

    /// <summary>KL(q ‖ uniform) = Σ_k q_k log(K q_k) with q = h/Σh, in nats; 0·log 0 = 0, so 0 exactly for a uniform
    /// histogram and log K when every digit is one class.</summary>
    public static double KlToUniform(IReadOnlyList<int> histogram)
    {
        long total = histogram.Sum(h => (long)h);
        if (total == 0)
        {
            throw new ArgumentException("class histogram is empty");
        }
        double kl = 0;
        foreach (int h in histogram)
        {
            if (h > 0)
            {
                double q = (double)h / total;
                kl += q * Math.Log(histogram.Count * q);
            }
        }
        return kl;
    }

    /// <summary>
    /// The Fréchet distance between Gaussians fitted to two feature sets a [n, d] and b [m, d] (row-major):
    ///   FD = ‖μ_a - μ_b‖² + tr(Σ_a) + tr(Σ_b) - 2 tr((Σ_a^½ Σ_b Σ_a^½)^½)
    /// with unbiased covariances (divided by n - 1, as pytorch-fid's np.cov). Σ_a^½ and the outer square root come from
    /// symmetric eigendecompositions (MathNet.Numerics), eigenvalues clipped at 0 against rounding; the form
    /// Σ_a^½ Σ_b Σ_a^½ is symmetric positive semi-definite, unlike Σ_a Σ_b, so its square root is real.
    /// </summary>
    public static double FrechetDistance(float[] a, int n, float[] b, int m, int d)
    {
        var (muA, covA) = Moments(a, n, d);
        var (muB, covB) = Moments(b, m, d);
        double meanTerm = (muA - muB).DotProduct(muA - muB);
        var rootA = SymmetricSqrt(covA);
        var middle = rootA * covB * rootA;
        // Symmetrise: the products leave rounding asymmetry that a symmetric solver must not see.
        middle = (middle + middle.Transpose()) * 0.5;
        double traceRoot = middle.Evd(Symmetricity.Symmetric).EigenValues.Sum(e => Math.Sqrt(Math.Max(e.Real, 0)));
        double fd = meanTerm + covA.Trace() + covB.Trace() - 2 * traceRoot;
        // Rounding can leave a tiny negative distance for identical sets.
        return Math.Max(fd, 0);
    }

    private static (Vector<double> Mean, Matrix<double> Cov) Moments(float[] x, int n, int d)
    {
        if (x.Length != n * d || n < 2)
        {
            throw new ArgumentException($"features: {x.Length} values are not {n} rows of {d} (need at least 2 rows)");
        }
        var rows = Matrix<double>.Build.Dense(n, d, (i, j) => x[i * d + j]);
        var mean = rows.ColumnSums() / n;
        var centred = rows - Matrix<double>.Build.Dense(n, d, (_, j) => mean[j]);
        var cov = centred.TransposeThisAndMultiply(centred) / (n - 1);
        return (mean, cov);
    }

    private static Matrix<double> SymmetricSqrt(Matrix<double> s)
    {
        var evd = s.Evd(Symmetricity.Symmetric);
        var v = evd.EigenVectors;
        var roots = Vector<double>.Build.Dense(s.RowCount, i => Math.Sqrt(Math.Max(evd.EigenValues[i].Real, 0)));
        return v * Matrix<double>.Build.DiagonalOfDiagonalVector(roots) * v.Transpose();
    }
}
