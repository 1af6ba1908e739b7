using System.Linq.Expressions;
using System.Reflection;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Every ILGPU kernel of the engine, compiled once for one accelerator and kept: loading compiles
/// (tens of milliseconds a kernel), so it happens here, at the device's first op, never inside a
/// forward pass. <see cref="For(IlgpuDevice)"/> returns the set cached on the device.
/// </summary>
public sealed class IlgpuKernels
{
    private readonly List<LoadedKernel> _loaded = [];
    private readonly List<KernelLaunches> _launches = [];

    private readonly bool _listing;

    private IlgpuKernels(IlgpuDevice device, bool listing = false)
    {
        _listing = listing;
        Device = device;
        Accelerator = device.Accelerator;
        Simple = device.SimpleKernels;
        Precision = device.Precision;
        Elementwise = new Elementwise.Gpu(this);
        Conv2d = new Conv2d.Gpu(this);
        GroupNorm = new GroupNorm.Gpu(this);
        Upsample = new Upsample.Gpu(this);
        Linear = new Linear.Gpu(this);
        Concat = new Concat.Gpu(this);
        Reduce = new Reduce.Gpu(this);
        TimeEmbedding = new TimeEmbedding.Gpu(this);
        Embedding = new Embedding.Gpu(this);
        Optim = new Optim.Gpu(this);
        Random = new RandomFill.Gpu(this);
        _gridCounters = Accelerator.Allocate1D<int>(CounterSlots);
        _gridCounters.MemSetToZero(Stream);
        _noTaps = Accelerator.Allocate1D(Enumerable.Repeat(new Tap(0, Taps.Nowhere), TiledGemm.TK).ToArray());
    }

    /// <summary>Arrival counters a kernel's groups count on to find the last of them (<see cref="TiledReduce.ArriveLast"/>):
    /// one per output tile of a split product (slots 0, 1, …), slot 0 for the GroupNorm backward; at most this many.
    /// Launches on the stream run one after another and each leaves its counters at zero, so they share the slots. A
    /// launch that dies half-way would leave a count behind; on a GPU that is a sticky CUDA error, which ends the
    /// context (and these counters) with it.</summary>
    public const int CounterSlots = 4096;

    private readonly MemoryBuffer1D<int, Stride1D.Dense> _gridCounters;

    /// <summary>The arrival counters, zero between launches (each kernel that counts puts them back).</summary>
    internal ArrayView<int> GridCounters => _gridCounters.View;

    // One tap table a convolution geometry the model runs (a few KB each), kept as long as the kernels: never freed.
    private readonly Dictionary<(Type Op, int C, int H, int W, int K, int R, int S, int Stride, int Pad), MemoryBuffer1D<Tap, Stride1D.Dense>> _tapTables = [];
    private readonly MemoryBuffer1D<Tap, Stride1D.Dense> _noTaps;

    /// <summary>
    /// The tap table of a tapped across-K B (<see cref="ITileOperands.Tapped"/>: the forward and input-gradient
    /// convolutions): entry kd is <c>TOp.TapOfB(kd)</c> for kd &lt; Kd, then taps that read nothing up to the next multiple of
    /// the K step and one K step beyond (the kernel fetches a step ahead, also after its last: a split's last group past
    /// the end of K, any other into the next split's range, whose taps read inside the tensor and are dropped), and one entry of
    /// zero bits (<see cref="TiledGemm.ZeroTap"/>). Built on the host and
    /// uploaded once a geometry (it does not depend on the batch), then kept with the kernels. A tapped along-K B (the
    /// weight gradient) gets the table of its first image's pixels instead (<see cref="ITileOperands.PixelOfBFromTable"/>:
    /// base and mask, as taps). Any other op gets a small table it never reads.
    /// </summary>
    internal ArrayView<Tap> TapTable<TOp>(TileArgs t) where TOp : struct, ITileOperands
    {
        if (!TOp.Tapped)
        {
            return _noTaps.View;
        }
        lock (_tapTables)
        {
            var g = t.Conv;
            var key = (typeof(TOp), g.C, g.H, g.W, g.K, g.R, g.S, g.Stride, g.Pad);
            if (!_tapTables.TryGetValue(key, out var table))
            {
                Tap[] taps;
                if (TOp.BAlongK(t))
                {
                    // Along K: the first image's pixels (the kernel adds an image's offset), a pixel's base and mask as a tap;
                    // then one entry of zero bits, a float 0 that a half of tap-major columns reads where its tap misses.
                    taps = new Tap[TOp.PixelsPerImage(t) + 1];
                    for (int i = 0; i < TOp.PixelsPerImage(t); i++)
                    {
                        var pixel = TOp.PixelOfB(t, i);
                        taps[i] = new Tap(pixel.Base, pixel.Mask);
                    }
                }
                else
                {
                    // A K step of padding past the last: the kernel fetches one step ahead, also after the last. Then one entry
                    // of zero bits, a float 0 that a K step of one tap reads where its tap misses the pixel (TiledGemm.ZeroTap).
                    taps = new Tap[TiledGemm.ZeroTap(t) + 1];
                    for (int kd = 0; kd < taps.Length - 1; kd++)
                    {
                        taps[kd] = kd < t.Kd ? TOp.TapOfB(t, kd) : new Tap(0, Taps.Nowhere);
                    }
                    taps[^1] = new Tap(0, 0);
                }
                table = Accelerator.Allocate1D(taps);
                _tapTables[key] = table;
            }
            return table.View;
        }
    }

    /// <summary>The convolution weights held permuted (<see cref="Conv2d.HoldWeights"/>), or null.</summary>
    internal HeldConvWeights? Held { get; set; }

    /// <summary>Ends any hold of weights: the optimizer and the EMA call it before they write parameters, so a hold its holder
    /// forgot to dispose cannot serve copies of the old values to the next step's convolutions (they permute at the call,
    /// and the next hold starts afresh).</summary>
    internal void WeightsWritten() => Held = null;

    private HeldConvWeights? _heldLayout;

    /// <summary>The layout of <paramref name="weights"/>' held copies: the last one when it was made for this very list (a
    /// training run's every step), else a new one (the last one's memory given back).</summary>
    internal HeldConvWeights HeldLayout(IReadOnlyList<Tensor> weights)
    {
        if (_heldLayout is not null && ReferenceEquals(_heldLayout.Weights, weights))
        {
            return _heldLayout;
        }
        // Forgotten before the new one is made: if making it fails, no later hold finds a freed layout.
        var old = _heldLayout;
        _heldLayout = null;
        old?.Free();
        return _heldLayout = new HeldConvWeights(this, weights);
    }

    private readonly Dictionary<string, MemoryBuffer1D<int, Stride1D.Dense>> _segmentTables = [];

    /// <summary>A held permutation's segment table on the device (<see cref="HeldConvWeights"/>): uploaded once a table (a model's
    /// tables are the same every step), then kept with the kernels.</summary>
    internal ArrayView<int> SegmentTable(int[] table)
    {
        lock (_segmentTables)
        {
            string key = string.Join(",", table);
            if (!_segmentTables.TryGetValue(key, out var buffer))
            {
                buffer = Accelerator.Allocate1D(table);
                _segmentTables[key] = buffer;
            }
            return buffer.View;
        }
    }

    /// <summary>The device these kernels were compiled for.</summary>
    public IlgpuDevice Device { get; }

    /// <summary>The accelerator these kernels were compiled for.</summary>
    public Accelerator Accelerator { get; }

    /// <summary>
    /// True: every op runs its simple twin (one thread per output, a loop inside) instead of the
    /// tiled, explicitly grouped kernel. Starts as the device's <see cref="IlgpuDevice.SimpleKernels"/>
    /// (the CLI's <c>--gpu-kernels</c> or <c>DDPM_GPU_KERNELS</c>); tests switch it on the kernel set.
    /// </summary>
    public bool Simple { get; set; }

    /// <summary>
    /// How the tiled products compute (<see cref="MathPrecision"/>): strict fp32 on the FFMA core, or TF32 or 3xTF32 on
    /// tensor cores, whose kernels load at their first use. Starts as the device's <see cref="IlgpuDevice.Precision"/>; the
    /// self-check lowers it to fp32 when a mode disagrees with the CPU backend. A device that cannot run the tensor-core
    /// kernels (<see cref="TensorCores"/> false) computes in fp32 whatever the mode.
    /// </summary>
    public MathPrecision Precision { get; set; }

    /// <summary>True when this accelerator runs the tensor-core kernels: CUDA (mma.sync), or ILGPU's CPU simulator shaped
    /// like a GPU (warps of 32, groups of 128), which runs their managed emulation.</summary>
    public bool TensorCores => Device.TensorCores;

    /// <summary>The mode the products actually run in: <see cref="Precision"/> where <see cref="TensorCores"/>, else fp32.</summary>
    public MathPrecision EffectivePrecision => TensorCores && !Simple ? Precision : MathPrecision.Fp32;

    private readonly List<LoadedKernel> _declared = [];

    /// <summary>Every kernel this set loads or may load at first use (the tensor-core modes'), once each: the list
    /// <c>check --ptx</c>, <c>check --sass</c> and the PTX tests compile.</summary>
    public IReadOnlyList<LoadedKernel> Compilable => [.. _loaded.Concat(_declared).DistinctBy(k => k.Method)];

    /// <summary>Notes an explicitly grouped kernel loaded only at first use (<see cref="Compilable"/>).</summary>
    internal void Declare(Delegate kernel, KernelSpecialization bounds) => _declared.Add(new LoadedKernel(kernel.Method, Grouped: true, bounds));

    /// <summary>The stream every op is queued on.</summary>
    public AcceleratorStream Stream => Accelerator.DefaultStream;

    internal Elementwise.Gpu Elementwise { get; }
    internal Conv2d.Gpu Conv2d { get; }
    internal GroupNorm.Gpu GroupNorm { get; }
    internal Upsample.Gpu Upsample { get; }
    internal Linear.Gpu Linear { get; }
    internal Concat.Gpu Concat { get; }
    internal Reduce.Gpu Reduce { get; }
    internal TimeEmbedding.Gpu TimeEmbedding { get; }
    internal Embedding.Gpu Embedding { get; }
    internal Optim.Gpu Optim { get; }
    internal RandomFill.Gpu Random { get; }

    /// <summary>Every kernel method loaded, with how it is launched: the list the PTX test compiles.</summary>
    public IReadOnlyList<LoadedKernel> Loaded => _loaded;

    /// <summary>The kernel set of <paramref name="device"/>, compiled on first use and cached.</summary>
    public static IlgpuKernels For(IlgpuDevice device) => device.GetExtension(d => new IlgpuKernels((IlgpuDevice)d));

    /// <summary>
    /// The kernels <see cref="For(IlgpuDevice)"/> would load on <paramref name="device"/>, listed (<see cref="Compilable"/>)
    /// but not compiled for it, for <c>check --ptx</c> and <c>check --sass</c>, which compile them for CUDA instead
    /// (compiling the whole set for ILGPU's CPU accelerator took 5.8 s of a 6.4 s `check --ptx` of one kernel). Not cached on
    /// the device; a launcher of this set throws.
    /// </summary>
    public static IlgpuKernels Listing(IlgpuDevice device) => new(device, listing: true);

    /// <summary>The kernel set of the device a tensor lives on.</summary>
    internal static IlgpuKernels For(Tensor t) => For((IlgpuDevice)t.Device);

    /// <summary>Loads an implicitly grouped kernel (one thread per index, ILGPU picks the group)
    /// as a launcher taking the stream first.</summary>
    internal TLauncher Auto<TLauncher>(Delegate kernel) where TLauncher : Delegate
    {
        _loaded.Add(new LoadedKernel(kernel.Method, Grouped: false, KernelSpecialization.Empty));
        return _listing ? Unloaded<TLauncher>() : Counted(Accelerator.LoadAutoGroupedKernel<TLauncher>(kernel.Method));
    }

    /// <summary>Loads an explicitly grouped kernel, launched with a <see cref="KernelConfig"/>; with
    /// <paramref name="bounds"/> (its launch bounds: at most so many threads a group, at least so many groups an SM, which
    /// ptxas turns into a register budget), where the device runs groups that large (a simulator with smaller groups
    /// runs the kernel's other path, and the bounds would not hold).</summary>
    internal TLauncher Grouped<TLauncher>(Delegate kernel, KernelSpecialization? bounds = null) where TLauncher : Delegate
    {
        var specialization = bounds is { MaxNumThreadsPerGroup: int threads } && threads <= Accelerator.MaxNumThreadsPerGroup ? bounds.Value : KernelSpecialization.Empty;
        _loaded.Add(new LoadedKernel(kernel.Method, Grouped: true, bounds ?? KernelSpecialization.Empty));
        return _listing ? Unloaded<TLauncher>() : Counted(Accelerator.LoadKernel<TLauncher>(kernel.Method, specialization, out _));
    }

    /// <summary>The launcher of a kernel a <see cref="Listing"/> set names but does not compile: it throws.</summary>
    private TLauncher Unloaded<TLauncher>() where TLauncher : Delegate
    {
        string name = $"{_loaded[^1].Method.DeclaringType?.Name}.{_loaded[^1].Method.Name}";
        var args = typeof(TLauncher).GetMethod("Invoke")!.GetParameters().Select(p => Expression.Parameter(p.ParameterType, p.Name)).ToArray();
        var fail = Expression.Throw(Expression.Constant(new InvalidOperationException($"{name}: listed, not loaded (IlgpuKernels.Listing)")));
        return Expression.Lambda<TLauncher>(fail, args).Compile();
    }

    /// <summary>
    /// The launcher wrapped so that every launch adds one to the device's <see cref="DeviceCounters"/>: a delegate of the
    /// same type whose body counts, then calls ILGPU's launcher with the same arguments (built once per kernel; a
    /// launch pays one interlocked increment and one more delegate call, and allocates nothing).
    /// </summary>
    private TLauncher Counted<TLauncher>(TLauncher launcher) where TLauncher : Delegate
    {
        var count = new KernelLaunches(_loaded[^1].Method, Device.Counters);
        _launches.Add(count);
        var invoke = typeof(TLauncher).GetMethod("Invoke")!;
        var args = invoke.GetParameters().Select(p => Expression.Parameter(p.ParameterType, p.Name)).ToArray();
        var body = Expression.Block(
            Expression.Call(Expression.Constant(count), typeof(KernelLaunches).GetMethod(nameof(KernelLaunches.Count))!),
            Expression.Invoke(Expression.Constant(launcher), args));
        return Expression.Lambda<TLauncher>(body, args).Compile();
    }

    /// <summary>Launches of each loaded kernel so far, in load order (the device's total is in <see cref="DeviceCounters"/>).</summary>
    public IReadOnlyList<KernelLaunches> Launches => _launches;

    /// <summary>A scratch tensor for reductions, from the device pool.</summary>
    internal Tensor Scratch(int length) => Tensor.Empty(Device, length);
}

/// <summary>How many times one kernel was launched; each launch also counts in the device's <see cref="DeviceCounters"/>.</summary>
public sealed class KernelLaunches(MethodInfo method, DeviceCounters device)
{
    private long _count;

    /// <summary>The kernel, e.g. "Conv2d.ForwardKernel" (the declaring type is the op family).</summary>
    public string Name { get; } = $"{method.DeclaringType?.Name}.{method.Name}";

    /// <summary>The op family: the class that declares the kernel.</summary>
    public string Family { get; } = method.DeclaringType?.Name ?? "?";

    /// <summary>Launches so far.</summary>
    public long Launches => Interlocked.Read(ref _count);

    /// <summary>Counts one launch (called by the wrapped launcher).</summary>
    public void Count()
    {
        Interlocked.Increment(ref _count);
        device.CountLaunch();
    }
}

/// <summary>A kernel entry point, whether it is explicitly grouped, and the launch bounds it has on a GPU.</summary>
public readonly record struct LoadedKernel(MethodInfo Method, bool Grouped, KernelSpecialization Bounds = default);
