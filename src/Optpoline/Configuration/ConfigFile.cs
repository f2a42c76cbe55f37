using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;

namespace Optpoline.Configuration;

/// <summary>
/// Reads and checks config files. Every problem (syntax, unknown or repeated key, wrong type, value
/// out of range) is a <see cref="ConfigException"/> that names the file, line and column.
/// </summary>
public static class ConfigFile
{
    /// <summary>Every key the config type has, read once from its source-generated metadata.</summary>
    private static readonly Lazy<HashSet<string>> Known = new(KnownKeys);

    /// <summary>The environment variable naming the config file when the host gives none.</summary>
    public const string EnvironmentVariable = "OPTPOLINE_CONFIG";

    /// <summary>The file to use: <paramref name="path"/> if given, else <c>$OPTPOLINE_CONFIG</c> if set, else none (defaults).</summary>
    public static string? Resolve(string? path)
    {
        if (!string.IsNullOrWhiteSpace(path))
        {
            return Path.GetFullPath(path);
        }

        var fromEnvironment = Environment.GetEnvironmentVariable(EnvironmentVariable);
        return string.IsNullOrWhiteSpace(fromEnvironment) ? null : Path.GetFullPath(fromEnvironment);
    }

    /// <summary>Reads and checks the file at <paramref name="path"/>.</summary>
    /// <exception cref="ConfigException">The file cannot be read or is invalid.</exception>
    public static OptpolineConfig Load(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        byte[] bytes;
        try
        {
            bytes = File.ReadAllBytes(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ConfigException(path, 0, 0, $"cannot read the file: {e.Message}", e);
        }

        return Parse(bytes, path);
    }

    /// <summary>Reads and checks config text; <paramref name="path"/> names it in messages.</summary>
    /// <exception cref="ConfigException">The text is invalid.</exception>
    public static OptpolineConfig Parse(string text, string path = "config") => Parse(Encoding.UTF8.GetBytes(text ?? throw new ArgumentNullException(nameof(text))), path);

    /// <summary>Reads and checks UTF-8 config bytes; <paramref name="path"/> names them in messages.</summary>
    /// <exception cref="ConfigException">The bytes are invalid.</exception>
    public static OptpolineConfig Parse(ReadOnlySpan<byte> utf8, string path = "config")
    {
        if (utf8.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF]))
        {
            utf8 = utf8[3..];
        }

        var keys = Scan(utf8, path);
        OptpolineConfig? config;
        try
        {
            config = JsonSerializer.Deserialize(utf8, ConfigJsonContext.Default.OptpolineConfig);
        }
        catch (JsonException e)
        {
            var key = e.Path is { Length: > 2 } p ? p[2..] : "(top)";
            throw new ConfigException(path, (int)(e.LineNumber ?? 0) + 1, (int)(e.BytePositionInLine ?? 0) + 1, $"{key}: wrong type or value ({FirstSentence(e.Message)})", e);
        }

        if (config is null)
        {
            throw new ConfigException(path, 1, 1, "the config must be a JSON object, not null.");
        }

        Validate(config, keys, path);
        return config;
    }

    /// <summary>Writes <paramref name="config"/> as JSON (every key).</summary>
    public static string Serialize(OptpolineConfig config) => JsonSerializer.Serialize(config, ConfigJsonContext.Default.OptpolineConfig);

    private static void Validate(OptpolineConfig c, Dictionary<string, (int Line, int Column)> keys, string path)
    {
        void Fail(string key, string problem)
        {
            var (line, column) = keys.TryGetValue(key, out var at) ? at : (1, 1);
            throw new ConfigException(path, line, column, $"{key}: {problem}");
        }

        void Range(string key, long value, long low, long high)
        {
            if (value < low || value > high)
            {
                Fail(key, $"{value} is out of range ({low} to {high}).");
            }
        }

        void OneOf(string key, string? value, params string[] allowed)
        {
            if (value is null || !allowed.Contains(value, StringComparer.Ordinal))
            {
                Fail(key, $"'{value}' is not one of {string.Join(", ", allowed.Select(a => $"\"{a}\""))}.");
            }
        }

        void Present(string key, object? value)
        {
            if (value is null)
            {
                Fail(key, "may not be null.");
            }
        }

        Present("promotion", c.Promotion);
        Present("learning", c.Learning);
        Present("patching", c.Patching);
        Present("sites", c.Sites);
        Present("tracing", c.Tracing);
        OneOf("promotion.mode", c.Promotion.Mode, "learn", "static", "off");
        OneOf("promotion.fallback", c.Promotion.Fallback, "retpoline", "indirect");
        Range("promotion.inlineSlots", c.Promotion.InlineSlots, 0, 2);
        Range("learning.samplePeriod", c.Learning.SamplePeriod, 1, 65536);
        Range("learning.epochMilliseconds", c.Learning.EpochMilliseconds, 1, 60000);
        Range("learning.ringCapacity", c.Learning.RingCapacity, 64, 1 << 24);
        Range("patching.flushTimeoutMilliseconds", c.Patching.FlushTimeoutMilliseconds, 1, 60000);
        Present("sites.include", c.Sites.Include);
        Present("sites.exclude", c.Sites.Exclude);
        foreach (var (name, list) in new[] { ("sites.include", c.Sites.Include), ("sites.exclude", c.Sites.Exclude) })
        {
            for (var i = 0; i < list.Length; i++)
            {
                if (string.IsNullOrEmpty(list[i]))
                {
                    Fail($"{name}[{i}]", "a site name pattern may not be empty or null.");
                }
            }
        }

        if (c.Tracing.Directory is { } directory && string.IsNullOrWhiteSpace(directory))
        {
            Fail("tracing.directory", "must name a directory, or be null for no tracing.");
        }

        if (!c.Tracing.TextPokes && !c.Tracing.JitDump)
        {
            Fail("tracing.jitDump", "tracing.textPokes and tracing.jitDump are both false: tracing would write nothing.");
        }
    }

    /// <summary>
    /// One pass over the tokens: syntax, unknown keys and repeated keys, with the place of every key
    /// (for the checks that run after deserialization).
    /// </summary>
    private static Dictionary<string, (int Line, int Column)> Scan(ReadOnlySpan<byte> utf8, string path)
    {
        var known = Known.Value;
        var places = new Dictionary<string, (int, int)>(StringComparer.Ordinal);
        var reader = new Utf8JsonReader(utf8, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
        var stack = new Stack<(string Prefix, bool IsArray, int Index, HashSet<string> Seen)>();
        string? pendingKey = null;
        try
        {
            while (reader.Read())
            {
                switch (reader.TokenType)
                {
                    case JsonTokenType.PropertyName:
                        {
                            var (prefix, _, _, seen) = stack.Peek();
                            var name = reader.GetString()!;
                            var key = prefix.Length == 0 ? name : $"{prefix}.{name}";
                            var at = Place(utf8, reader.TokenStartIndex);
                            if (!seen.Add(name))
                            {
                                throw new ConfigException(path, at.Line, at.Column, $"{key}: the key appears twice in one object.");
                            }

                            if (!known.Contains(key))
                            {
                                var section = prefix.Length == 0 ? "the top level" : $"'{prefix}'";
                                var siblings = known.Where(k => k.StartsWith(prefix.Length == 0 ? string.Empty : prefix + ".", StringComparison.Ordinal)
                                    && !k[(prefix.Length == 0 ? 0 : prefix.Length + 1)..].Contains('.', StringComparison.Ordinal));
                                throw new ConfigException(path, at.Line, at.Column,
                                    $"{key}: unknown key; {section} takes {string.Join(", ", siblings.Select(k => k.Split('.')[^1]))}.");
                            }

                            places[key] = at;
                            pendingKey = key;
                            break;
                        }

                    case JsonTokenType.StartObject:
                    case JsonTokenType.StartArray:
                        {
                            var key = NextKey(stack, ref pendingKey, utf8, reader.TokenStartIndex, places);
                            stack.Push((key, reader.TokenType == JsonTokenType.StartArray, 0, new HashSet<string>(StringComparer.Ordinal)));
                            break;
                        }

                    case JsonTokenType.EndObject:
                    case JsonTokenType.EndArray:
                        stack.Pop();
                        break;

                    default:
                        NextKey(stack, ref pendingKey, utf8, reader.TokenStartIndex, places);
                        break;
                }
            }
        }
        catch (JsonException e)
        {
            throw new ConfigException(path, (int)(e.LineNumber ?? 0) + 1, (int)(e.BytePositionInLine ?? 0) + 1, $"syntax: {FirstSentence(e.Message)}", e);
        }

        return places;
    }

    /// <summary>The key of the value now read: the property just named, or the next element of the array around it.</summary>
    private static string NextKey(Stack<(string Prefix, bool IsArray, int Index, HashSet<string> Seen)> stack, ref string? pendingKey, ReadOnlySpan<byte> utf8, long offset, Dictionary<string, (int, int)> places)
    {
        if (stack.Count > 0 && stack.Peek().IsArray)
        {
            var top = stack.Pop();
            stack.Push(top with { Index = top.Index + 1 });
            var element = $"{top.Prefix}[{top.Index}]";
            places[element] = Place(utf8, offset);
            return element;
        }

        var key = pendingKey ?? string.Empty;
        pendingKey = null;
        return key;
    }

    private static (int Line, int Column) Place(ReadOnlySpan<byte> utf8, long offset)
    {
        var before = utf8[..(int)offset];
        var line = before.Count((byte)'\n') + 1;
        var lineStart = before.LastIndexOf((byte)'\n') + 1;
        return (line, Encoding.UTF8.GetCharCount(before[lineStart..]) + 1);
    }

    private static HashSet<string> KnownKeys()
    {
        var keys = new HashSet<string>(StringComparer.Ordinal);
        void Walk(JsonTypeInfo info, string prefix)
        {
            foreach (var property in info.Properties)
            {
                var key = prefix.Length == 0 ? property.Name : $"{prefix}.{property.Name}";
                keys.Add(key);
                if (property.PropertyType.IsClass && property.PropertyType != typeof(string) && !property.PropertyType.IsArray)
                {
                    Walk(ConfigJsonContext.Default.GetTypeInfo(property.PropertyType)!, key);
                }
            }
        }

        Walk(ConfigJsonContext.Default.OptpolineConfig, string.Empty);
        return keys;
    }

    private static string FirstSentence(string message)
    {
        var cut = message.IndexOf(" Path:", StringComparison.Ordinal);
        var text = (cut >= 0 ? message[..cut] : message).Trim();
        var lineInfo = text.IndexOf(" LineNumber:", StringComparison.Ordinal);
        return (lineInfo >= 0 ? text[..lineInfo] : text).TrimEnd('.', ' ', '|');
    }
}
