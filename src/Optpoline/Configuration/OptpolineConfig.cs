using System.Text.Json.Serialization;

namespace Optpoline.Configuration;

/// <summary>
/// The engine's config file (JSON; comments and trailing commas allowed; unknown keys refused). Every
/// key is optional; <c>optpoline.json</c> at the repository root documents them all. Read it with
/// <see cref="ConfigFile.Parse(string, string)"/> or <see cref="ConfigFile.Load"/>.
/// </summary>
public sealed class OptpolineConfig
{
    /// <summary>Who promotes targets, and the fallback.</summary>
    public PromotionConfig Promotion { get; set; } = new();

    /// <summary>The sampling learner.</summary>
    public LearningConfig Learning { get; set; } = new();

    /// <summary>Live patching.</summary>
    public PatchingConfig Patching { get; set; } = new();

    /// <summary>Which sites may be promoted.</summary>
    public SitesConfig Sites { get; set; } = new();

    /// <summary>Text-poke records, jitdump and images.</summary>
    public TracingConfig Tracing { get; set; } = new();
}

/// <summary>The <c>promotion</c> section.</summary>
public sealed class PromotionConfig
{
    /// <summary><c>promotion.enabled</c>: false keeps every site on the fallback (live: demotes them all). Default true.</summary>
    public bool Enabled { get; set; } = true;

    /// <summary><c>promotion.mode</c>: "learn" (the learner promotes), "static" (only explicit promotions) or "off". Default "learn".</summary>
    public string Mode { get; set; } = "learn";

    /// <summary><c>promotion.fallback</c>: "retpoline" or "indirect" (a plain <c>jmp reg</c>). Read when the engine is created. Default "retpoline".</summary>
    public string Fallback { get; set; } = "retpoline";

    /// <summary><c>promotion.inlineSlots</c>: inline slots of the sites the C ABI emits (0 to 2). Default 1.</summary>
    public int InlineSlots { get; set; } = 1;
}

/// <summary>The <c>learning</c> section.</summary>
public sealed class LearningConfig
{
    /// <summary><c>learning.background</c>: the engine's own learner thread ends epochs; false: the host calls them. Default true.</summary>
    public bool Background { get; set; } = true;

    /// <summary><c>learning.samplePeriod</c>: one sample per this many fallback calls per CPU (1 to 65536). Default 64.</summary>
    public int SamplePeriod { get; set; } = 64;

    /// <summary><c>learning.epochMilliseconds</c>: the background learner's epoch (1 to 60000). Default 100.</summary>
    public int EpochMilliseconds { get; set; } = 100;

    /// <summary><c>learning.ringCapacity</c>: samples per CPU ring between epochs (64 to 16777216). Read when the engine is created. Default 16384.</summary>
    public int RingCapacity { get; set; } = 16384;

    /// <summary>
    /// <c>learning.profile</c>: a profile (<see cref="OptpolineEngine.SaveProfile"/>) to start from, so
    /// that sites promote at their first epoch; relative to the config file's directory. Loaded when the
    /// engine is created and again whenever the value changes; a file that cannot be read is reported in
    /// <see cref="OptpolineEngine.ConfigWarnings"/> and learning starts from scratch. Default null.
    /// </summary>
    public string? Profile { get; set; }
}

/// <summary>The <c>patching</c> section.</summary>
public sealed class PatchingConfig
{
    /// <summary><c>patching.suspended</c>: no site changes (a trace that needs a stable text). Default false.</summary>
    public bool Suspended { get; set; }

    /// <summary><c>patching.flushTimeoutMilliseconds</c>: how long a grace period waits for every thread (1 to 60000). Read when the engine is created. Default 500.</summary>
    public int FlushTimeoutMilliseconds { get; set; } = 500;
}

/// <summary>The <c>sites</c> section.</summary>
public sealed class SitesConfig
{
    /// <summary><c>sites.include</c>: name patterns (<c>*</c>, <c>?</c>) of the sites that may be promoted; empty: all. Default empty.</summary>
    public string[] Include { get; set; } = [];

    /// <summary><c>sites.exclude</c>: name patterns of sites that stay on the fallback. Default empty.</summary>
    public string[] Exclude { get; set; } = [];
}

/// <summary>The <c>tracing</c> section.</summary>
public sealed class TracingConfig
{
    /// <summary><c>tracing.directory</c>: where traces go; null: tracing off. Default null.</summary>
    public string? Directory { get; set; }

    /// <summary><c>tracing.textPokes</c>: perf.data text pokes and the start/end images. Default true.</summary>
    public bool TextPokes { get; set; } = true;

    /// <summary><c>tracing.jitDump</c>: jit-PID.dump for perf inject. Default true.</summary>
    public bool JitDump { get; set; } = true;
}

/// <summary>Source-generated (de)serialization, so the config works under NativeAOT.</summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase,
    ReadCommentHandling = System.Text.Json.JsonCommentHandling.Skip,
    AllowTrailingCommas = true,
    UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
    WriteIndented = true)]
[JsonSerializable(typeof(OptpolineConfig))]
internal sealed partial class ConfigJsonContext : JsonSerializerContext
{
}
